"""The ``reference`` backend: every operation in plain PyTorch with fp64 accumulation.

This is the oracle the fused backends are compared with, and the backend that takes what the
kernels cannot (sparse and complex gradients, devices without kernels). It favours exactness over
speed: each gradient is widened to fp64 (complex128 for complex gradients), the p-norm is computed
on values divided by the global max magnitude so that no finite input overflows or underflows, and
the rescaled gradient is rounded to its dtype exactly once. Nothing else in the package calls into
this module: it runs only when it is the selected backend.

All functions here take already-validated arguments (see ``fusedclip._args``) and never
synchronize with the device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedclip.backends import BackendStatus
from fusedclip.backends._math import clip_coef, ratio_pow, refuse_meta_beside_data, root_norm

NAME = "reference"


def status() -> BackendStatus:
    return BackendStatus(True, "pure PyTorch, fp64 accumulation; any device, sparse and complex "
                         "gradients", None)


def _values(t: Tensor, coalesce: bool = True) -> Tensor:
    """The elements that count towards the norm (for sparse COO tensors the coalesced values, or
    the values as stored without ``coalesce``); complex ones widened first, since |z| of a
    complex64 is a rounded result."""
    if t.is_sparse:
        v = t.detach().coalesce().values() if coalesce else t.detach()._values()
    else:
        v = t.detach()
    return v.to(torch.complex128) if v.is_complex() else v


def _peak(t: Tensor, coalesce: bool = True) -> Tensor:
    """max |t| as 0-dim fp64 (exact in t's own dtype; NaN if any element is NaN; 0 if empty)."""
    v = _values(t, coalesce)
    if v.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=t.device)
    return torch.linalg.vector_norm(v, math.inf).to(torch.float64)


def total_norm(
    tensors: list[Tensor],
    norm_type: float,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    """The p-norm of all ``tensors`` as if concatenated: 0-dim fp64 on ``tensors[0]``'s device.

    ``norm_type`` is a positive float or ``inf``. NaN anywhere gives NaN; otherwise an infinite
    element gives ``inf``, as in torch. One tensor at a time is widened to fp64, and only scalars
    move between devices.

    AMP: with ``inv_scale`` (a one-element fp32 tensor) the tensors hold loss-scaled values and the
    result is the norm of ``x * inv_scale``; ``found_inf`` (one-element fp32) is set to 1 when any
    element is inf or NaN and left as it is otherwise.
    """
    refuse_meta_beside_data(tensors)
    device = tensors[0].device
    peaks = [_peak(t).to(device) for t in tensors]
    peak = torch.stack(peaks).amax()
    if found_inf is not None:
        # The largest magnitude is inf or NaN exactly when some element is. Sparse gradients are
        # checked as stored, before coalescing (which could add finite duplicates up to inf), as
        # torch's unscale_ checks them.
        stored = [_peak(t, coalesce=False).to(device) if t.is_sparse else m
                  for t, m in zip(tensors, peaks)]
        found_inf.masked_fill_(~torch.isfinite(torch.stack(stored).amax()).to(found_inf.device),
                               1.0)
    inv = None if inv_scale is None else inv_scale.to(device=device,
                                                        dtype=torch.float64).reshape(())
    return _norm_from_peak(tensors, norm_type, peak, inv)


def _norm_from_peak(tensors: list[Tensor], norm_type: float, peak: Tensor,
                    inv: Tensor | None = None) -> Tensor:
    """The p-norm of ``tensors`` whose largest magnitude is ``peak``, times ``inv`` (1 if None)."""
    device = peak.device
    if math.isinf(norm_type):
        return peak if inv is None else peak * inv
    # Scale by the largest magnitude so sum(|x|^p) cannot overflow or underflow in fp64; fall back
    # to 1 where the peak is 0 (the norm is 0) or not finite (the peak is the answer).
    usable = torch.isfinite(peak) & (peak > 0)
    scale = torch.where(usable, peak, torch.ones_like(peak))
    scale_on = {device: scale}
    powered = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        v = _values(t)
        if v.numel():
            s = scale_on.setdefault(t.device, scale.to(t.device))
            # |x| is exact in x's dtype; the power of its ratio to the peak is taken in fp64.
            powered += ratio_pow(v.abs().to(torch.float64), s, norm_type).sum().to(device)
    norm = root_norm(scale, powered, norm_type, inv)
    return torch.where(torch.isfinite(peak), norm, peak if inv is None else peak * inv)


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """``t <- t * coef`` in place for every tensor, in fp64, rounded once to t's dtype."""
    coef_on: dict[torch.device, Tensor] = {}
    for t in tensors:
        c = coef_on.setdefault(t.device, coef.to(device=t.device, dtype=torch.float64))
        target = t._values() if t.is_sparse else t
        target.copy_(_wide(target) * c)


def clip_with_norm_(
    tensors: list[Tensor], max_norm: float, norm: Tensor, soft: bool = False
) -> None:
    """Rescale ``tensors`` in place given a precomputed total norm."""
    scale_(tensors, clip_coef(max_norm, norm, soft))


def clip_(
    tensors: list[Tensor],
    max_norm: float,
    norm_type: float,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> Tensor:
    """Global-norm clipping: returns the fp64 total norm and rescales ``tensors`` in place. With
    ``inv_scale`` (AMP) the tensors are unscaled and clipped in one multiply by
    ``inv_scale * min(1, max_norm / (norm + 1e-6))``, the norm being that of the unscaled values;
    ``found_inf`` as in ``total_norm``."""
    norm = total_norm(tensors, norm_type, inv_scale, found_inf)
    coef = clip_coef(max_norm, norm, soft)
    if inv_scale is not None:
        coef = coef * inv_scale.to(device=coef.device, dtype=torch.float64).reshape(())
    scale_(tensors, coef)
    return norm


def clip_stats_(
    tensors: list[Tensor], max_norm: float, norm_type: float, soft: bool, per_tensor: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``clip_`` that also returns (fp64 norm, fp64 coefficient, per-tensor norms or None)."""
    per = None
    if per_tensor:
        refuse_meta_beside_data(tensors)
        device = tensors[0].device
        per = torch.stack([total_norm([t], norm_type).to(device) for t in tensors])
    norm = total_norm(tensors, norm_type)
    coef = clip_coef(max_norm, norm, soft)
    scale_(tensors, coef)
    return norm, coef, per


def clip_per_tensor_(
    tensors: list[Tensor], max_norms: Tensor, norm_type: float, soft: bool = False
) -> Tensor:
    """Per-tensor clipping: tensor i scaled in place by the coefficient of its own norm under
    ``max_norms[i]``; returns the per-tensor norms (fp64, on ``tensors[0]``'s device)."""
    refuse_meta_beside_data(tensors)
    device = tensors[0].device
    norms = torch.stack([total_norm([t], norm_type).to(device) for t in tensors])
    coefs = clip_coef(max_norms.to(device=device, dtype=torch.float64), norms, soft)
    for i, t in enumerate(tensors):
        scale_([t], coefs[i])
    return norms


def _unit_norms(t: Tensor, norm_type: float) -> Tensor:
    """The norms of t's units in fp64, as timm's unitwise_norm: over all dims but the first for
    tensors of two or more dims (kept for broadcasting), else over the whole tensor. Each unit is
    divided by its largest magnitude first (as ``total_norm``), so that no finite unit overflows:
    fp64 gradients near the dtype's largest value have a finite unit norm (``t`` not empty)."""
    v = t.detach().to(torch.float64).abs()
    if v.dim() <= 1:
        v, dims, keep = v.reshape(-1), (0,), False
    else:
        dims, keep = tuple(range(1, v.dim())), True
    peak = v.amax(dim=dims, keepdim=keep)  # NaN where a unit holds a NaN
    if math.isinf(norm_type):
        return peak
    usable = torch.isfinite(peak) & (peak > 0)
    scale = torch.where(usable, peak, 1.0)
    s = ratio_pow(torch.where(usable, v, 0.0), scale, norm_type).sum(dim=dims, keepdim=keep)
    return torch.where(usable, root_norm(scale, s, norm_type), peak)


def adaptive_clip_(
    grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float, norm_type: float
) -> None:
    """Adaptive gradient clipping as timm's ``adaptive_clip_grad`` (NFNets), in fp64: each unit
    of ``grads[i]`` whose norm reaches ``clip_factor * max(norm of the unit of params[i], eps)``
    is scaled down to it (``max_norm / max(grad_norm, 1e-6)``); the others keep their bits.
    Every coefficient is found before any gradient is written, as the fused backends do (so a
    gradient that shares memory with a parameter after it reads the same)."""
    coefs = []
    for g, p in zip(grads, params):
        if g.numel() == 0:
            continue
        limit = _unit_norms(p, norm_type).to(g.device).clamp(min=eps) * clip_factor
        norm = _unit_norms(g, norm_type)
        coefs.append((g, torch.where(norm < limit, 1.0, limit / norm.clamp(min=1e-6))))
    for g, coef in coefs:
        g.copy_(g.to(torch.float64) * coef)


# (significand bits, largest exponent) of the formats a bound is rounded through.
_FORMATS = {torch.float32: (24, 127), torch.float16: (11, 15), torch.bfloat16: (8, 127)}


def _rounded(x: float, digits: int, emax: int) -> float:
    """``x > 0``, far above the subnormals, rounded to the nearest value (ties to even) of a
    binary format with ``digits`` significand bits; inf past its largest, ``(2 - 2^(1 - digits))
    * 2^emax``. (On Python floats: a tensor would be read back on the host.)"""
    _, e = math.frexp(x)  # x = f * 2^e, f in [0.5, 1): its last kept bit weighs 2^(e - digits)
    r = math.ldexp(round(math.ldexp(x, digits - e)), e - digits)
    return r if r < 2.0 ** (emax + 1) else math.inf


def _bound_for(clip_value: float, dtype: torch.dtype) -> float:
    """``clip_value`` for torch's clamp of a ``dtype`` tensor. As it is where the dtype holds it
    (torch rounds it there as the other backends do: csrc/engine/norm_math.h ``bound_as``); past
    the dtype's largest value, what they round it to, through fp32 for fp16/bf16 (that largest
    value, or inf, which clamps nothing), where torch's conversion raises instead."""
    if dtype not in _FORMATS or clip_value <= torch.finfo(dtype).max or math.isinf(clip_value):
        return clip_value
    bound = _rounded(clip_value, *_FORMATS[torch.float32])
    return bound if dtype == torch.float32 or math.isinf(bound) else _rounded(bound,
                                                                              *_FORMATS[dtype])


def clamp_(tensors: list[Tensor], clip_value: float) -> None:
    """Clip every element to ``[-b, b]`` in place, b ``clip_value`` rounded to the tensor's dtype
    (NaN stays NaN, as in torch). A bound past the dtype's range clamps nothing, as in the other
    backends; torch raises there, after clamping the tensors before it."""
    for t in tensors:
        b = _bound_for(clip_value, t.dtype)
        t.clamp_(min=-b, max=b)


def clip_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> None:
    """No one-call path: ``clip_grad_norm_`` takes the general one."""
    return None


norm_params = clip_params


def partials_(tensors: list[Tensor], norm_type: float, out: Tensor) -> None:
    """Tensor i's partial (m, s) into ``out[i]``: m = max |x| (NaN or inf as the elements are) and
    s = sum (|x| / m)^p in fp64, or s = 0 where m is 0 or not finite (or p is inf)."""
    for i, t in enumerate(tensors):
        m = _peak(t)
        s = torch.zeros((), dtype=torch.float64, device=t.device)
        if not math.isinf(norm_type) and _values(t).numel():
            scale = torch.where(torch.isfinite(m) & (m > 0), m, 1.0)
            s = torch.where(torch.isfinite(m), ratio_pow(_values(t).abs().to(torch.float64),
                                                         scale, norm_type).sum(), 0.0)
        out[i].copy_(torch.stack([m, s]))


def finish_partials(
    partials: Tensor, norm_type: float, max_norm: float, inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None, soft: bool = False,
) -> tuple[Tensor, Tensor]:
    """(norm, coefficient) of the elements the rows (m, s) of ``partials`` describe: the largest m,
    times (the sum of s * (m / largest)^p)^(1/p); the coefficient also unscales (``inv_scale``),
    and ``found_inf`` is set when an m is inf or NaN."""
    m, s = partials[:, 0], partials[:, 1]
    peak = m.amax() if m.numel() else torch.zeros((), dtype=torch.float64, device=m.device)
    inv = None if inv_scale is None else inv_scale.to(device=m.device,
                                                      dtype=torch.float64).reshape(())
    bare = peak if inv is None else peak * inv
    if math.isinf(norm_type):
        norm = bare
    else:
        usable = torch.isfinite(peak) & (peak > 0)
        scale = torch.where(usable, peak, 1.0)
        # Rows with m = 0 add nothing; rows past a non-finite m do not matter (norm = m).
        ratio = ratio_pow(torch.where(m > 0, m, 0.0).clamp(max=scale), scale, norm_type)
        total = torch.where(m > 0, s * ratio, 0.0).sum()
        norm = torch.where(usable, root_norm(scale, total, norm_type, inv), bare)
    if found_inf is not None:
        found_inf.masked_fill_(~torch.isfinite(peak).to(found_inf.device), 1.0)
    coef = clip_coef(max_norm, norm, soft)
    return norm, coef if inv is None else coef * inv


def clamp_params(params: list[Tensor], clip_value: float, *, cuda_only: bool = True) -> bool:
    """No one-call path: ``clip_grad_value_`` takes the general one."""
    return False


def clip_stats_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    soft: bool = False,
) -> None:
    """No one-call path: ``return_stats`` takes the general one."""
    return None
