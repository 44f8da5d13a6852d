"""Automatic clipping thresholds, derived from the history of total norms and kept on the device.

``AutoClipper(parameters, method=...)`` is stepped once per iteration, after the backward pass and
before the optimizer: ``clipper.step()`` measures the total norm (pass 1 of the engine), derives
the threshold from the history on the device, and rescales (pass 2, nothing written when the norm
is under the threshold). No host synchronization: the history lives in device tensors and the
only host state is the step count.

- ``method="zscore"``, ZClip's rule: the first ``warmup_steps`` norms are only recorded; their
  mean and (population) variance start exponential moving averages (``alpha``). Then a norm whose
  z-score ``(norm - mean) / (std + 1e-6)`` exceeds ``z_thresh`` is clipped to
  ``mean + z_thresh * std / (z / z_thresh)`` (ZClip's default "adaptive scaling"; with
  ``clip_option="mean"``, to the mean), and the averages are updated with the norm after clipping
  (``mean <- alpha * mean + (1 - alpha) * x``, ``var <- alpha * var + (1 - alpha) * (x - mean)^2``),
  so a spike does not inflate them. Non-finite norms are left out of the warmup statistics and
  of the updates (ZClip does not handle them).
- ``method="percentile"``, as in AutoClip: the ``percentile``-th percentile of the last ``window``
  total norms (the current one included, non-finite ones left out) is the threshold.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fusedclip import _select, distributed
from fusedclip._args import (
    as_pass_norm_type,
    as_soft,
    check_writable_grads,
    collect_tensors,
    grads_of,
    norm_result_dtype,
)
from fusedclip.backends._math import clip_coef

__all__ = ["AutoClipper"]

METHODS = ("zscore", "percentile")


def nanquantile(values: Tensor, q: float) -> Tensor:
    """``torch.nanquantile(values, q)`` of a 1-D tensor, the same bits (linear interpolation
    between the two ranks around ``q * (n - 1)`` of the n values that are not NaN; NaN when all
    are), in ops that torch.compile traces on every torch fusedclip supports: torch 2.6 and 2.11
    break the graph at ``torch.nanquantile`` (a data-dependent check inside it)."""
    ordered = torch.sort(values).values  # NaN sorts last
    count = (~torch.isnan(values)).sum()
    rank = (count - 1).clamp(min=0).to(values.dtype) * q
    below, above = rank.long().reshape(1), rank.ceil().long().reshape(1)
    weight = (rank - below.to(values.dtype)).reshape(1)
    result = torch.lerp(ordered.gather(0, below), ordered.gather(0, above), weight).reshape(())
    return torch.where(count == 0, math.nan, result)


class AutoClipper:
    """Clips the gradients of ``parameters`` with a threshold learned from their norm history.

    >>> clipper = fusedclip.AutoClipper(model.parameters(), method="zscore")
    >>> loss.backward()
    >>> norm = clipper.step()   # the total norm before clipping, a device tensor
    >>> optimizer.step()

    ``threshold`` holds the threshold of the last step (inf while warming up). ``state_dict()``
    and ``load_state_dict()`` save and restore the history (tensors, on their device).
    """

    def __init__(
        self,
        parameters: Any,
        method: str = "zscore",
        *,
        z_thresh: float = 2.5,
        alpha: float = 0.97,
        clip_option: str = "adaptive_scaling",
        warmup_steps: int | None = None,
        percentile: float = 10.0,
        window: int = 1000,
        norm_type: float = 2.0,
        mode: str = "hard",
        backend: str | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be 'zscore' or 'percentile', got {method!r}")
        if warmup_steps is None:  # ZClip's default; AutoClip clips from the second step on
            warmup_steps = 25 if method == "zscore" else 1
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(
                f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        if not z_thresh > 0:
            raise ValueError(f"z_thresh must be > 0, got {z_thresh}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if warmup_steps < 1 or window < 1:
            raise ValueError(
                f"need warmup_steps >= 1 and window >= 1, got {warmup_steps} and {window}")
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        self.params = collect_tensors(parameters, name="parameters")
        self.method, self.z_thresh, self.alpha = method, float(z_thresh), float(alpha)
        self.clip_option = clip_option
        self.warmup_steps, self.percentile, self.window = warmup_steps, float(percentile), window
        self.norm_type = as_pass_norm_type(norm_type, "AutoClipper")
        self.soft = as_soft(mode)
        # Checked now; None reads FUSEDCLIP_BACKEND at every step, as the functions do.
        self._choice = _select.parse(backend) if backend is not None else None
        self.steps = 0
        self._state: dict[str, Tensor] = {}

    # ---- the history, on the device --------------------------------------------------------------

    def _tensors(self, device: torch.device) -> dict[str, Tensor]:
        if not self._state:
            f64 = dict(dtype=torch.float64, device=device)
            if self.method == "zscore":
                self._state = {"mean": torch.zeros((), **f64), "var": torch.zeros((), **f64),
                               "warmup": torch.full((self.warmup_steps,), math.nan, **f64)}
            else:
                self._state = {"history": torch.full((self.window,), math.nan, **f64)}
            self._state["threshold"] = torch.full((), math.inf, **f64)
        elif self._state["threshold"].device != device:  # e.g. loaded with map_location="cpu"
            self._state = {k: v.to(device) for k, v in self._state.items()}
        return self._state

    @property
    def threshold(self) -> Tensor | None:
        """The last step's threshold (fp64, on the device; inf where it did not clip)."""
        return self._state.get("threshold")

    def _percentile(self, state: dict[str, Tensor], norm: Tensor) -> Tensor:
        history = state["history"]
        history[self.steps % self.window] = torch.where(torch.isfinite(norm), norm, math.nan)
        if self.steps < self.warmup_steps:
            return torch.full_like(norm, math.inf)
        threshold = nanquantile(history, self.percentile / 100)
        return torch.where(torch.isnan(threshold), math.inf, threshold)

    def _zscore(self, state: dict[str, Tensor], norm: Tensor) -> Tensor:
        """This step's threshold (inf: no clipping), updating the statistics.

        The 0-dim statistics (and ``step``'s threshold) are replaced in ``state``, never written
        in place: torch 2.13's ``torch.compile`` loses an in-place write into a 0-dim float64
        CPU tensor that enters the graph holding a finite value (Dynamo gives it a float symbol,
        as for a Python float, specializes that and restarts the trace, and the new trace has no
        ``copy_``), which left a compiled ``step`` with mean and var at 0. The 1-dim warmup and
        history buffers are written in place."""
        finite = torch.isfinite(norm)
        if self.steps < self.warmup_steps:
            warmup = state["warmup"]
            warmup[self.steps] = torch.where(finite, norm, math.nan)
            if self.steps == self.warmup_steps - 1:
                mean = warmup.nanmean()
                state["mean"] = mean
                state["var"] = (warmup - mean).square().nanmean()
            return torch.full_like(norm, math.inf)
        mean, var = state["mean"], state["var"]
        std = var.sqrt()
        z = (norm - mean) / (std + 1e-6)
        spike = z > self.z_thresh
        if self.clip_option == "mean":
            bound = mean
        else:
            bound = mean + self.z_thresh * std / (z / self.z_thresh)
        threshold = torch.where(spike, bound, math.inf)
        seen = torch.where(spike, bound, norm)  # the norm after clipping
        new_mean = self.alpha * mean + (1 - self.alpha) * seen
        new_var = self.alpha * var + (1 - self.alpha) * (seen - new_mean).square()
        state["mean"] = torch.where(finite, new_mean, mean)
        state["var"] = torch.where(finite, new_var, var)
        return threshold

    # ---- stepping --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> Tensor:
        """Measure, derive the threshold, clip in place; returns the total norm before clipping
        (float32 or wider, on the first gradient's device; ``tensor(0.)`` without gradients)."""
        grads = grads_of(self.params)
        if not grads:
            return torch.tensor(0.0)
        distributed.refuse_dtensors(grads, "AutoClipper")
        check_writable_grads(grads)
        impl = _select.select(self._choice or _select.parse(None), grads)
        norm = impl.total_norm(grads, self.norm_type)
        state = self._tensors(norm.device)
        if self.method == "zscore":
            threshold = self._zscore(state, norm)
            # ZClip scales only a norm above its threshold: by threshold / (norm + 1e-6).
            coef = (clip_coef(threshold, norm, True) if self.soft else
                    torch.where(norm > threshold, threshold / (norm + 1e-6), 1.0))
        else:
            threshold = self._percentile(state, norm)
            coef = clip_coef(threshold, norm, self.soft)
        impl.scale_(grads, coef)
        state["threshold"] = threshold.to(torch.float64)  # replaced, not copied: see _zscore
        self.steps += 1
        return norm.to(norm_result_dtype(grads))

    # ---- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The history and settings: tensors stay on their device, as an optimizer's do."""
        return {
            "method": self.method, "steps": self.steps, "z_thresh": self.z_thresh,
            "alpha": self.alpha, "clip_option": self.clip_option,
            "warmup_steps": self.warmup_steps, "percentile": self.percentile,
            "window": self.window, "norm_type": self.norm_type, "soft": self.soft,
            "state": {k: v.clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["method"] != self.method:
            raise ValueError(
                f"state_dict is for method {state_dict['method']!r}, this clipper uses "
                f"{self.method!r}"
            )
        for key in ("z_thresh", "alpha", "clip_option", "warmup_steps", "percentile", "window",
                    "norm_type", "soft"):
            setattr(self, key, state_dict[key])
        self.steps = int(state_dict["steps"])
        self._state = {k: v.clone() for k, v in state_dict["state"].items()}
