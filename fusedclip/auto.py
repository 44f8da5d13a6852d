"""Automatic clipping thresholds, derived from the history of total norms and kept on the device.

``AutoClipper(parameters, method=...)`` is stepped once per iteration, after the backward pass and
before the optimizer: ``clipper.step()`` measures the total norm (pass 1 of the engine), derives
the threshold from the history on the device, and rescales (pass 2, nothing written when the norm
is under the threshold). No host synchronization: the history lives in device tensors and the
only host state is the step count.

- ``method="zscore"``, as in ZClip: exponential moving averages of the norm's mean and variance
  (``alpha``). After ``warmup_steps``, a norm above ``mean + z_thresh * std`` is clipped to that
  bound. The averages are then updated with the norm after clipping, so a spike does not inflate
  them; non-finite norms leave them unchanged.
- ``method="percentile"``, as in AutoClip: the ``percentile``-th percentile of the last ``window``
  total norms (the current one included, non-finite ones left out) is the threshold.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fusedclip import backends, reference
from fusedclip.inputs import (
    as_norm_type,
    as_soft,
    check_writable_grads,
    collect_tensors,
    grads_of,
    norm_result_dtype,
)

__all__ = ["AutoClipper"]

METHODS = ("zscore", "percentile")


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
        warmup_steps: int = 25,
        percentile: float = 10.0,
        window: int = 1000,
        norm_type: float = 2.0,
        mode: str = "hard",
        backend: str | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be 'zscore' or 'percentile', got {method!r}")
        if not z_thresh > 0:
            raise ValueError(f"z_thresh must be > 0, got {z_thresh}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if warmup_steps < 0 or window < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and window >= 1, got {warmup_steps} and {window}")
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        self.params = collect_tensors(parameters, name="parameters")
        self.method, self.z_thresh, self.alpha = method, float(z_thresh), float(alpha)
        self.warmup_steps, self.percentile, self.window = warmup_steps, float(percentile), window
        self.norm_type = as_norm_type(norm_type)
        self.soft = as_soft(mode)
        self.backend = backends.check_name(backend)[0] if backend is not None else None
        self.steps = 0
        self._state: dict[str, Tensor] = {}

    # ---- the history, on the device --------------------------------------------------------------

    def _tensors(self, device: torch.device) -> dict[str, Tensor]:
        if not self._state:
            f64 = dict(dtype=torch.float64, device=device)
            if self.method == "zscore":
                self._state = {"mean": torch.zeros((), **f64), "var": torch.zeros((), **f64)}
            else:
                self._state = {"history": torch.full((self.window,), math.nan, **f64)}
            self._state["threshold"] = torch.full((), math.inf, **f64)
        return self._state

    @property
    def threshold(self) -> Tensor | None:
        """The last step's threshold (fp64, on the device; inf while warming up)."""
        return self._state.get("threshold")

    def _threshold(self, state: dict[str, Tensor], norm: Tensor) -> Tensor:
        if self.method == "percentile":
            history = state["history"]
            history[self.steps % self.window] = torch.where(torch.isfinite(norm), norm, math.nan)
            if self.steps < self.warmup_steps:
                return torch.full_like(norm, math.inf)
            threshold = torch.nanquantile(history, self.percentile / 100)
            return torch.where(torch.isnan(threshold), math.inf, threshold)
        if self.steps < max(self.warmup_steps, 1):
            return torch.full_like(norm, math.inf)
        return state["mean"] + self.z_thresh * state["var"].sqrt()

    def _update_zscore(self, state: dict[str, Tensor], norm: Tensor, threshold: Tensor) -> None:
        seen = torch.minimum(norm, threshold)  # the norm after clipping
        finite = torch.isfinite(seen)
        if self.steps == 0:
            mean, var = seen, torch.zeros_like(seen)
        else:
            delta = seen - state["mean"]
            mean = state["mean"] + (1 - self.alpha) * delta
            var = self.alpha * (state["var"] + (1 - self.alpha) * delta * delta)
        state["mean"].copy_(torch.where(finite, mean, state["mean"]))
        state["var"].copy_(torch.where(finite, var, state["var"]))

    # ---- stepping --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> Tensor:
        """Measure, derive the threshold, clip in place; returns the total norm before clipping
        (torch's dtype, on the first gradient's device; ``tensor(0.)`` without gradients)."""
        grads = grads_of(self.params)
        if not grads:
            return torch.tensor(0.0)
        check_writable_grads(grads)
        impl = backends.select(self.backend, grads)
        norm = impl.total_norm(grads, self.norm_type)
        state = self._tensors(norm.device)
        threshold = self._threshold(state, norm)
        impl.scale_(grads, reference.clip_coef(threshold, norm, self.soft))
        if self.method == "zscore":
            self._update_zscore(state, norm, threshold)
        state["threshold"].copy_(threshold)
        self.steps += 1
        return norm.to(norm_result_dtype(grads))

    # ---- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The history and settings: tensors stay on their device, as an optimizer's do."""
        return {
            "method": self.method, "steps": self.steps, "z_thresh": self.z_thresh,
            "alpha": self.alpha, "warmup_steps": self.warmup_steps,
            "percentile": self.percentile, "window": self.window, "norm_type": self.norm_type,
            "soft": self.soft, "state": dict(self._state),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["method"] != self.method:
            raise ValueError(
                f"state_dict is for method {state_dict['method']!r}, this clipper uses "
                f"{self.method!r}"
            )
        for key in ("z_thresh", "alpha", "warmup_steps", "percentile", "window", "norm_type",
                    "soft"):
            setattr(self, key, state_dict[key])
        self.steps = int(state_dict["steps"])
        self._state = {k: v.clone() for k, v in state_dict["state"].items()}
