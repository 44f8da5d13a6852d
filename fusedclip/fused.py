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
    "adaptive_clip_", "clamp_", "clip_", "clip_params", "clip_per_tensor_", "clip_stats_",
    "clip_with_norm_", "norm_params",
    "scale_", "total_norm",
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


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without the host waiting: a host tensor goes through pinned memory."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _amp(inv_scale: Tensor | None, found_inf: Tensor | None) -> bool:
    return inv_scale is not None or found_inf is not None


class FusedOps:
    """The reference's interface (``total_norm``, ``scale_``, ``clip_with_norm_``, ``clip_``,
    ``clip_per_tensor_``, ``clamp_``) on top of a backend's operators; shared by the ``cuda`` and
    ``triton`` backends. The operators take dense tensors on one device: views with gaps go
    through a dense copy that is written back, several devices are reduced one by one and
    combined.

    norm(tensors, norm_type, max_norm, per_tensor, inv_scale, found_inf, soft) -> (fp64 norm, fp64
    coefficient, per-tensor norms or empty), pass 1; clip(tensors, max_norm,
    norm_type, inv_scale, found_inf, soft) -> fp64 norm, both passes; scale(tensors, coef) in
    place; clip_per_tensor(tensors, max_norms, norm_type, soft) -> per-tensor norms, both passes;
    clamp(tensors, clip_value) in place; adaptive_clip(grads, params, clip_factor, eps, norm_type)
    in place. inv_scale and found_inf (None, or one-element fp32
    tensors on the tensors' device) are the AMP path: see ``fusedclip.reference.total_norm``;
    soft selects the soft coefficient. check_device(tensors) raises for a device the operators
    cannot run on.
    """

    def __init__(
        self,
        name: str,
        norm: Callable[..., Tensor],
        clip: Callable[..., Tensor],
        scale: Callable[[list[Tensor], Tensor], None],
        clip_per_tensor: Callable[[list[Tensor], Tensor, float, bool], Tensor],
        clamp: Callable[[list[Tensor], float], None],
        adaptive_clip: Callable[[list[Tensor], list[Tensor], float, float, float], None],
        check_device: Callable[[list[Tensor]], None] = lambda tensors: None,
    ) -> None:
        self.name, self._norm, self._clip, self._scale = name, norm, clip, scale
        self._clip_per_tensor, self._clamp = clip_per_tensor, clamp
        self._adaptive_clip = adaptive_clip
        self._check_device = check_device

    def _groups(
        self, tensors: list[Tensor], one_device: str | None = None
    ) -> dict[torch.device, list[Tensor]]:
        check_tensors(tensors, self.name)
        groups = by_device(tensors)
        for ts in groups.values():
            self._check_device(ts)
        if one_device and len(groups) > 1:
            raise ValueError(
                f"backend {self.name!r}: {one_device} takes the gradients of one device at a time"
            )
        return groups

    @staticmethod
    def _in_place(tensors: list[Tensor], run: Callable[[list[Tensor]], object]) -> object:
        """``run`` on the dense stand-ins of ``tensors`` (one device), then views with gaps get
        their copies' new values back."""
        staged, write_back = dense_staged(tensors)
        result = run(staged)
        for view, copy in write_back:
            view.copy_(copy)
        return result

    def total_norm(
        self,
        tensors: list[Tensor],
        norm_type: float,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Tensor:
        """The norm of all tensors as if concatenated: 0-dim fp64 on ``tensors[0]``'s device.
        With ``inv_scale``, of the unscaled values (AMP, one device)."""
        amp = "the AMP path" if _amp(inv_scale, found_inf) else None
        norms = [self._norm(dense_staged(ts)[0], norm_type, math.inf, False, inv_scale,
                            found_inf, False)[0]
                 for ts in self._groups(tensors, amp).values()]
        # The p-norm of the per-device norms is the p-norm of everything.
        return norms[0] if len(norms) == 1 else reference.total_norm(norms, norm_type)

    def scale_(self, tensors: list[Tensor], coef: Tensor) -> None:
        """``t <- t * coef`` in place (fp64 product, one rounding); no writes when it is 1."""
        for device, ts in self._groups(tensors).items():
            c = coef.to(device=device, dtype=torch.float64).reshape(())
            self._in_place(ts, lambda staged, c=c: self._scale(staged, c))

    def clip_with_norm_(
        self, tensors: list[Tensor], max_norm: float, norm: Tensor, soft: bool = False
    ) -> None:
        """Rescale in place by the coefficient of ``norm`` (``reference.clip_coef``), computed
        on the device."""
        self.scale_(tensors, reference.clip_coef(max_norm, norm, soft))

    def clip_(
        self,
        tensors: list[Tensor],
        max_norm: float,
        norm_type: float,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        soft: bool = False,
    ) -> Tensor:
        """Global-norm clipping in place: returns the fp64 total norm. Both passes in one call
        when the gradients are on one device. With ``inv_scale`` (AMP, one device) the gradients
        are unscaled and clipped in one multiply."""
        amp = "the AMP path" if _amp(inv_scale, found_inf) else None
        if len(self._groups(tensors, amp)) > 1:
            norm = self.total_norm(tensors, norm_type)
            self.clip_with_norm_(tensors, max_norm, norm, soft)
            return norm
        return self._in_place(
            tensors,
            lambda staged: self._clip(staged, max_norm, norm_type, inv_scale, found_inf, soft))

    def clip_stats_(
        self, tensors: list[Tensor], max_norm: float, norm_type: float, soft: bool,
        per_tensor: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``clip_`` that also returns what it decided: (fp64 norm, fp64 coefficient, per-tensor
        norms when ``per_tensor``, one device only) in the same two passes."""
        groups = self._groups(tensors, "per-tensor norms" if per_tensor else None)
        if len(groups) > 1:
            norm = self.total_norm(tensors, norm_type)
            coef = reference.clip_coef(max_norm, norm, soft)
            self.scale_(tensors, coef)
            return norm, coef, None

        def run(staged: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
            norm, coef, per = self._norm(staged, norm_type, max_norm, per_tensor, None, None, soft)
            self._scale(staged, coef)
            return norm, coef, per if per_tensor else None

        return self._in_place(tensors, run)

    def clip_per_tensor_(
        self, tensors: list[Tensor], max_norms: Tensor, norm_type: float, soft: bool = False
    ) -> Tensor:
        """Per-tensor clipping in place: tensor i scaled by the coefficient of its own norm under
        ``max_norms[i]`` (one per tensor); returns the fp64 per-tensor norms, on
        ``tensors[0]``'s device. Two passes per device."""
        self._groups(tensors)
        first = tensors[0].device
        order: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            order.setdefault(t.device, []).append(i)
        per_device = []
        for device, idx in order.items():
            limits = _to_device(max_norms[idx].to(torch.float64).contiguous(), device)
            per = self._in_place(
                [tensors[i] for i in idx],
                lambda staged, limits=limits: self._clip_per_tensor(staged, limits, norm_type,
                                                                    soft))
            per_device.append((idx, per))
        if len(per_device) == 1:
            return per_device[0][1]
        # Several devices: concatenated in device order, then put back in the tensors' order by
        # a permutation built on the device (a host index would be a blocking copy).
        merged = torch.cat([per.to(first, non_blocking=True) for _, per in per_device])
        where = _to_device(torch.tensor([i for idx, _ in per_device for i in idx]), first)
        return torch.empty_like(merged).index_copy_(0, where, merged)

    def adaptive_clip_(
        self, grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float,
        norm_type: float,
    ) -> None:
        """Adaptive gradient clipping (``fusedclip.reference.adaptive_clip_``) in place: one read
        of the parameters and of the gradients, one write of the units over their threshold.
        Non-contiguous tensors go through contiguous copies (gradients written back)."""
        for device in self._groups(grads):
            idx = [i for i, g in enumerate(grads) if g.device == device]
            mine = [grads[i] for i in idx]
            staged = [g if g.is_contiguous() else g.contiguous() for g in mine]
            theirs = [params[i].detach().to(device).contiguous() for i in idx]
            self._adaptive_clip(staged, theirs, clip_factor, eps, norm_type)
            for g, s in zip(mine, staged):
                if s is not g:
                    g.copy_(s)

    def clamp_(self, tensors: list[Tensor], clip_value: float) -> None:
        """Value clipping in one read and one write per element, bitwise as torch's clamp."""
        for ts in self._groups(tensors).values():
            self._in_place(ts, lambda staged: self._clamp(staged, clip_value))


_OPS = FusedOps(
    "cuda",
    # Looked up at call time: without fusedclip._C the namespace has no operators.
    norm=lambda *args: torch.ops.fusedclip.total_norm(*args),
    clip=lambda ts, max_norm, p, inv, found, soft: torch.ops.fusedclip.clip_(
        ts, max_norm, p, False, inv, found, soft)[0],
    scale=lambda ts, coef: torch.ops.fusedclip.scale_(ts, coef),
    clip_per_tensor=lambda ts, limits, p, soft: torch.ops.fusedclip.clip_per_tensor_(
        ts, limits, p, soft),
    clamp=lambda ts, v: torch.ops.fusedclip.clamp_(ts, v),
    adaptive_clip=lambda gs, ps, factor, eps, p: torch.ops.fusedclip.adaptive_clip_(
        gs, ps, factor, eps, p),
)
total_norm = _OPS.total_norm
scale_ = _OPS.scale_
clip_with_norm_ = _OPS.clip_with_norm_
clip_ = _OPS.clip_
clip_per_tensor_ = _OPS.clip_per_tensor_
clip_stats_ = _OPS.clip_stats_
clamp_ = _OPS.clamp_
adaptive_clip_ = _OPS.adaptive_clip_


def clip_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> Tensor | None:
    """``clip_grad_norm_`` on ``params`` in one C++ call (gradients read, plan checked, both passes
    launched), returning the norm in torch's dtype; None when some gradient needs the general path
    (not dense, not a kernel dtype, on several devices, a tensor subclass...) or there is none.
    ``inv_scale``/``found_inf``: the AMP path (see ``fusedclip.reference.total_norm``)."""
    if not _extension.loaded():
        return None
    return _extension.module().clip_params(params, max_norm, norm_type, cuda_only, inv_scale,
                                           found_inf, soft)


def norm_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> tuple[Tensor, Tensor] | None:
    """Pass 1 of ``clip_params`` alone: (the norm in torch's dtype, the fp64 factor that would
    unscale and clip), gradients untouched; None for the general path."""
    if not _extension.loaded():
        return None
    return _extension.module().norm_params(params, max_norm, norm_type, cuda_only, inv_scale,
                                           found_inf, soft)
