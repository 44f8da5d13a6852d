"""Monitoring without host synchronization: what a clip decided, kept on the device.

``clip_grad_norm_(..., return_stats=True)`` returns a ``ClipStats`` of device tensors instead of
the bare norm. Reading one of them on the host is a synchronization, so ``StatsWindow`` collects
them step after step on the device and moves a window of them to the host in one transfer every
``every`` steps, as a flat dict a logger (TensorBoard, W&B) takes as it is.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

__all__ = ["ClipStats", "StatsWindow"]


@dataclasses.dataclass(frozen=True)
class ClipStats:
    """One clip's decisions, all 0-dim device tensors on the first gradient's device.

    total_norm: the norm before clipping, as ``clip_grad_norm_`` returns it (float32 or wider).
    clip_coef: the fp64 coefficient the gradients were multiplied by (1: untouched).
    clipped: bool, the coefficient was below 1.
    nonfinite: bool, the norm was inf or NaN.
    per_tensor_norms: fp64, one per gradient, with ``return_stats="per_tensor"``; else None.
    """

    total_norm: Tensor
    clip_coef: Tensor
    clipped: Tensor
    nonfinite: Tensor
    per_tensor_norms: Tensor | None = None

    @classmethod
    def of(cls, norm: Tensor, coef: Tensor, result_dtype: torch.dtype,
           per_tensor: Tensor | None = None) -> ClipStats:
        """From pass 1's fp64 norm and coefficient (a few element-wise ops, no synchronization)."""
        return cls(norm.to(result_dtype), coef, coef < 1, ~torch.isfinite(norm), per_tensor)


class StatsWindow:
    """``ClipStats`` of consecutive steps, summarized for a logger every ``every`` steps.

    >>> window = StatsWindow(every=100)
    >>> stats = fusedclip.clip_grad_norm_(model.parameters(), 1.0, return_stats=True)
    >>> if (logs := window.add(stats)) is not None:
    ...     wandb.log(logs)

    ``add`` keeps the step's tensors on the device; on every ``every``-th step it stacks the
    window, copies it to the host in one transfer and returns the summary (``summary()`` does the
    same at any time, e.g. at the end of training). Keys, each prefixed with ``prefix``:
    ``norm_mean``/``norm_min``/``norm_max`` (over the finite norms; NaN if there is none),
    ``norm_last``, ``clip_coef_mean``, ``clipped_fraction``, ``nonfinite_steps``, ``steps``.
    """

    def __init__(self, every: int = 100, prefix: str = "grad/") -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.prefix = every, prefix
        self._rows: list[Tensor] = []

    def add(self, stats: ClipStats) -> dict[str, float] | None:
        """Keep this step's stats (on their device); the summary when the window is full."""
        self._rows.append(torch.stack([stats.total_norm.double(), stats.clip_coef.double(),
                                       stats.clipped.double(), stats.nonfinite.double()]))
        return self.summary() if len(self._rows) >= self.every else None

    def summary(self) -> dict[str, float]:
        """The window so far as plain floats (one device-to-host transfer per device the rows
        are on: one, normally), then an empty window."""
        if not self._rows:
            return {}
        on: dict[torch.device, list[int]] = {}
        for i, row in enumerate(self._rows):
            on.setdefault(row.device, []).append(i)
        window = torch.empty(len(self._rows), 4, dtype=torch.float64)
        for idx in on.values():
            window[idx] = torch.stack([self._rows[i] for i in idx]).cpu()
        self._rows = []
        norms, coefs, clipped, nonfinite = window.unbind(1)
        finite = norms[torch.isfinite(norms)]
        nan = float("nan")
        p = self.prefix
        return {
            f"{p}norm_mean": float(finite.mean()) if finite.numel() else nan,
            f"{p}norm_min": float(finite.min()) if finite.numel() else nan,
            f"{p}norm_max": float(finite.max()) if finite.numel() else nan,
            f"{p}norm_last": float(norms[-1]),
            f"{p}clip_coef_mean": float(coefs.nanmean()),
            f"{p}clipped_fraction": float(clipped.mean()),
            f"{p}nonfinite_steps": float(nonfinite.sum()),
            f"{p}steps": float(len(norms)),
        }
