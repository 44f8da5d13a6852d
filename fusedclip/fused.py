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
from collections.abc import Callable

import torch
from torch import Tensor

from fusedclip import _extension, reference

KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

__all__ = [
    "clamp_", "clip_", "clip_params", "clip_with_norm_", "norm_params", "scale_", "total_norm"
]


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


def _amp(inv_scale: Tensor | None, found_inf: Tensor | None) -> bool:
    return inv_scale is not None or found_inf is not None


class FusedOps:
    """The reference's interface (``total_norm``, ``scale_``, ``clip_with_norm_``, ``clip_``,
    ``clamp_``) on top of a backend's three operators; shared by the ``cuda`` and ``triton``
    backends. The operators take dense tensors on one device: views with gaps go through a dense
    copy that is written back, several devices are reduced one by one and combined.

    norm(tensors, norm_type, inv_scale, found_inf) -> fp64 norm; clip(tensors, max_norm,
    norm_type, inv_scale, found_inf) -> fp64 norm, both passes; scale(tensors, coef) in place.
    inv_scale and found_inf (None, or one-element fp32 tensors on the tensors' device) are the AMP
    path: see ``fusedclip.reference.total_norm``. check_device(tensors) raises for a device the
    operators cannot run on.
    """

    def __init__(
        self,
        name: str,
        norm: Callable[[list[Tensor], float, Tensor | None, Tensor | None], Tensor],
        clip: Callable[[list[Tensor], float, float, Tensor | None, Tensor | None], Tensor],
        scale: Callable[[list[Tensor], Tensor], None],
        check_device: Callable[[list[Tensor]], None] = lambda tensors: None,
    ) -> None:
        self.name, self._norm, self._clip, self._scale = name, norm, clip, scale
        self._check_device = check_device

    def _groups(
        self, tensors: list[Tensor], amp: bool = False
    ) -> dict[torch.device, list[Tensor]]:
        check_tensors(tensors, self.name)
        groups = by_device(tensors)
        for ts in groups.values():
            self._check_device(ts)
        if amp and len(groups) > 1:
            raise ValueError(
                f"backend {self.name!r}: the AMP path takes the gradients of one device at a time "
                "(found_inf is per device)"
            )
        return groups

    def total_norm(
        self,
        tensors: list[Tensor],
        norm_type: float,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Tensor:
        """The norm of all tensors as if concatenated: 0-dim fp64 on ``tensors[0]``'s device.
        With ``inv_scale``, of the unscaled values (AMP, one device)."""
        norms = [self._norm(dense_staged(ts)[0], norm_type, inv_scale, found_inf)
                 for ts in self._groups(tensors, _amp(inv_scale, found_inf)).values()]
        # The p-norm of the per-device norms is the p-norm of everything.
        return norms[0] if len(norms) == 1 else reference.total_norm(norms, norm_type)

    def scale_(self, tensors: list[Tensor], coef: Tensor) -> None:
        """``t <- t * coef`` in place (fp64 product, one rounding); no writes when it is 1."""
        for device, ts in self._groups(tensors).items():
            staged, write_back = dense_staged(ts)
            self._scale(staged, coef.to(device=device, dtype=torch.float64).reshape(()))
            for view, copy in write_back:
                view.copy_(copy)

    def clip_with_norm_(self, tensors: list[Tensor], max_norm: float, norm: Tensor) -> None:
        """Rescale in place by ``min(1, max_norm / (norm + 1e-6))``, computed on the device."""
        self.scale_(tensors, reference.clip_coef(max_norm, norm))

    def clip_(
        self,
        tensors: list[Tensor],
        max_norm: float,
        norm_type: float,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Tensor:
        """Global-norm clipping in place: returns the fp64 total norm. Both passes in one call
        when the gradients are on one device. With ``inv_scale`` (AMP, one device) the gradients
        are unscaled and clipped in one multiply."""
        if len(self._groups(tensors, _amp(inv_scale, found_inf))) > 1:
            norm = self.total_norm(tensors, norm_type)
            self.clip_with_norm_(tensors, max_norm, norm)
            return norm
        staged, write_back = dense_staged(tensors)
        norm = self._clip(staged, max_norm, norm_type, inv_scale, found_inf)
        for view, copy in write_back:
            view.copy_(copy)
        return norm

    def clamp_(self, tensors: list[Tensor], clip_value: float) -> None:
        """Value clipping: not fused yet, the reference's per-tensor clamp."""
        reference.clamp_(tensors, clip_value)


_OPS = FusedOps(
    "cuda",
    norm=lambda ts, p, inv, found: torch.ops.fusedclip.total_norm(
        ts, p, math.inf, False, inv, found)[0],
    clip=lambda ts, max_norm, p, inv, found: torch.ops.fusedclip.clip_(
        ts, max_norm, p, False, inv, found)[0],
    scale=lambda ts, coef: torch.ops.fusedclip.scale_(ts, coef),
)
total_norm = _OPS.total_norm
scale_ = _OPS.scale_
clip_with_norm_ = _OPS.clip_with_norm_
clip_ = _OPS.clip_
clamp_ = _OPS.clamp_


def clip_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor | None:
    """``clip_grad_norm_`` on ``params`` in one C++ call (gradients read, plan checked, both passes
    launched), returning the norm in torch's dtype; None when some gradient needs the general path
    (not dense, not a kernel dtype, on several devices, a tensor subclass...) or there is none.
    ``inv_scale``/``found_inf``: the AMP path (see ``fusedclip.reference.total_norm``)."""
    if not _extension.loaded():
        return None
    return _extension.module().clip_params(params, max_norm, norm_type, cuda_only, inv_scale,
                                           found_inf)


def norm_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Pass 1 of ``clip_params`` alone: (the norm in torch's dtype, the fp64 factor that would
    unscale and clip), gradients untouched; None for the general path."""
    if not _extension.loaded():
        return None
    return _extension.module().norm_params(params, max_norm, norm_type, cuda_only, inv_scale,
                                           found_inf)
