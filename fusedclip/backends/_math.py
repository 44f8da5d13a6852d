"""Arithmetic on norms that the backends and the features above them share: the clip coefficient
and the combination of partial norms. All of it runs on the device, in fp64, without a host
synchronization.

(The kernels have their own copy of these rules, csrc/engine/norm_math.h and
``fusedclip.backends.triton.kernels``; tests hold all of them to the independent oracle.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NORM_EPS", "clip_coef", "combine_norms"]

# Added to the total norm before dividing, exactly as torch.nn.utils.clip_grad_norm_ does.
NORM_EPS = 1e-6


def clip_coef(max_norm: float | Tensor, norm: Tensor, soft: bool = False) -> Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` in fp64; NaN for a NaN norm, 0 for an infinite one.

    ``soft``: ``max_norm / (norm + max_norm)``, below 1 for every positive norm and smooth in it;
    1 where there is nothing to shrink (a zero norm) or no limit (``max_norm`` inf), NaN for a NaN
    norm. ``max_norm`` may be a tensor (one threshold per norm, per-tensor clipping)."""
    norm = norm.to(torch.float64)
    if not soft:
        return (max_norm / (norm + NORM_EPS)).clamp(max=1.0)
    limit = torch.as_tensor(max_norm, dtype=torch.float64, device=norm.device)
    coef = torch.where((norm == 0) | torch.isinf(limit), 1.0, limit / (norm + limit))
    return torch.where(torch.isnan(norm), norm, coef)


def combine_norms(norms: list[Tensor], norm_type: float) -> Tensor:
    """The p-norm of the union of disjoint sets of elements, from each set's p-norm (0-dim, any
    devices): fp64 on ``norms[0]``'s device. NaN if any is NaN, else inf if any is inf; finite norms
    are divided by the largest first, so their powers cannot overflow."""
    device = norms[0].device
    stacked = torch.stack([n.to(device=device, dtype=torch.float64).reshape(()) for n in norms])
    peak = stacked.amax()  # NaN when any is NaN
    if math.isinf(norm_type):
        return peak
    scale = torch.where(torch.isfinite(peak) & (peak > 0), peak, 1.0)
    total = scale * (stacked / scale).pow(norm_type).sum().pow(1.0 / norm_type)
    return torch.where(torch.isfinite(peak), total, peak)
