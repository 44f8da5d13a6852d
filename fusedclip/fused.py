"""The ``cuda`` backend: the fused passes of ``fusedclip._C`` (csrc/) behind the reference's API.

Pass 1 (``torch.ops.fusedclip.total_norm``) reads every gradient once and leaves the norm and the
clip coefficient on the device; pass 2 (``scale_``) rescales in place and writes nothing when the
coefficient is 1. ``torch.ops.fusedclip.clip_`` runs both in one call. The tensor table behind them
is a cached plan (csrc/plan.h), rebuilt only when a gradient's storage, size or dtype changes.

The operators also have CPU implementations (the same table and arithmetic, one thread), which is
how these functions run, and are tested, on machines without a GPU; ``fusedclip.backends`` offers
this module as the ``cuda`` backend for CUDA tensors only.

Gradients the kernels cannot take as they are get a clear error or a documented detour, never a
different backend: sparse and complex gradients raise (use ``backend="reference"``); strided
views with gaps are processed through a dense copy that is written back; gradients on several
devices are reduced per device and combined.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedclip import _extension, reference

KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

__all__ = ["clamp_", "clip_", "clip_params", "clip_with_norm_", "scale_", "total_norm"]


def check_tensors(tensors: list[Tensor], backend: str = "cuda") -> None:
    """Raise for what the fused kernels cannot take at all, before anything is touched."""
    for i, t in enumerate(tensors):
        if t.layout != torch.strided:
            raise TypeError(
                f"gradients[{i}] is a {t.layout} tensor; backend {backend!r} takes dense "
                "gradients only (use backend='reference' for sparse ones)"
            )
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"gradients[{i}] has dtype {t.dtype}; backend {backend!r} takes float32, float64, "
                "float16 and bfloat16 (use backend='reference' for complex ones)"
            )


def by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def _isdense_staged(t: Tensor) -> bool:
    """Contiguous up to a permutation of its dims: no gaps, no element stored twice."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=t.stride, reverse=True)
    return t.permute(order).is_contiguous()


def dense_staged(tensors: list[Tensor]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The tensors the kernels can read in place, with a dense copy standing in for each strided
    view with gaps; and the (view, copy) pairs to write back after an in-place pass."""
    staged, write_back = [], []
    for t in tensors:
        if _isdense_staged(t):
            staged.append(t)
        else:
            copy = t.contiguous()
            staged.append(copy)
            write_back.append((t, copy))
    return staged, write_back


def total_norm(tensors: list[Tensor], norm_type: float) -> Tensor:
    """The norm of all tensors as if concatenated: 0-dim fp64 on ``tensors[0]``'s device."""
    check_tensors(tensors)
    groups = by_device(tensors)
    norms = [
        torch.ops.fusedclip.total_norm(dense_staged(ts)[0], norm_type, math.inf, False)[0]
        for ts in groups.values()
    ]
    if len(norms) == 1:
        return norms[0]
    # The p-norm of the per-device norms is the p-norm of everything.
    return reference.total_norm(norms, norm_type)


def scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """``t <- t * coef`` in place (fp64 product, one rounding); nothing is written when it is 1."""
    check_tensors(tensors)
    for device, ts in by_device(tensors).items():
        staged, write_back = dense_staged(ts)
        torch.ops.fusedclip.scale_(staged, coef.to(device=device, dtype=torch.float64).reshape(()))
        for view, copy in write_back:
            view.copy_(copy)


def clip_with_norm_(tensors: list[Tensor], max_norm: float, norm: Tensor) -> None:
    """Rescale in place by ``min(1, max_norm / (norm + 1e-6))``, computed on the device."""
    scale_(tensors, reference.clip_coef(max_norm, norm))


def clip_(tensors: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Global-norm clipping in place: returns the fp64 total norm. Both passes in one call when
    the gradients are dense and on one device."""
    check_tensors(tensors)
    groups = by_device(tensors)
    if len(groups) == 1:
        staged, write_back = dense_staged(tensors)
        norm = torch.ops.fusedclip.clip_(staged, max_norm, norm_type, False)[0]
        for view, copy in write_back:
            view.copy_(copy)
        return norm
    norm = total_norm(tensors, norm_type)
    clip_with_norm_(tensors, max_norm, norm)
    return norm


def clamp_(tensors: list[Tensor], clip_value: float) -> None:
    """Value clipping: not fused yet, the reference's per-tensor clamp."""
    reference.clamp_(tensors, clip_value)


def clip_params(
    params: list[Tensor], max_norm: float, norm_type: float, *, cuda_only: bool = True
) -> Tensor | None:
    """``clip_grad_norm_`` on ``params`` in one C++ call (gradients read, plan checked, both passes
    launched), returning the norm in torch's dtype; None when some gradient needs the general path
    (not dense, not a kernel dtype, on several devices, a tensor subclass...) or there is none."""
    if not _extension.loaded():
        return None
    return _extension.module().clip_params(params, max_norm, norm_type, cuda_only)
