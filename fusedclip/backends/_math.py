"""Arithmetic on norms that the backends and the features above them share: the clip coefficient
and the combination of partial norms. All of it runs on the device, in fp64, without a host
synchronization.

(The kernels have their own copy of these rules, csrc/engine/norm_math.h and
``fusedclip.triton_kernels``; tests hold all of them to the independent oracle.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NORM_EPS", "clip_coef", "combine_norms", "general_norm", "kernels_take_norm_type",
           "ratio_pow", "refuse_meta_beside_data", "root_norm"]

# Added to the total norm before dividing, exactly as torch.nn.utils.clip_grad_norm_ does.
NORM_EPS = 1e-6
_TINY = torch.finfo(torch.float64).tiny  # the smallest normal fp64 number


def ratio_pow(b: Tensor, a: Tensor, p: float) -> Tensor:
    """``(b / a)^p`` in fp64, element-wise, for ``0 <= b <= a`` and ``0 < a < inf``, p > 0
    (csrc/engine/norm_math.h ``ratio_pow``). A ratio below the normal range has lost bits or
    flushed to 0, yet for p < 1 its power is not negligible (``(1e-400)^0.01 = 1e-4``, beside the
    1 of the largest magnitude): there the power is taken from the logs of b and a instead."""
    r = b / a
    if p == 1.0:
        return r
    if p == 2.0:
        return r * r
    logged = torch.where(b > 0, torch.exp(p * (b.log() - a.log())), 0.0)
    return torch.where(r >= _TINY, r.pow(p), logged)


def root_norm(peak: Tensor, s: Tensor, p: float, inv: Tensor | None = None) -> Tensor:
    """``peak * s^(1/p) * inv`` in fp64 (``inv`` 1 when None) for a finite ``peak > 0`` and
    ``s >= 0``, finite and not flushed to 0 wherever that value is (csrc/engine/norm_math.h
    ``finish_norm``). ``s^(1/p)`` alone overflows for a small p (``2000^(1/0.01) = 1e330``; for a
    negative p with a small ``|p|`` it underflows) long before ``peak`` brings the product back
    (2000 elements of 1e-100 have the 0.01-norm 1.3e230), and ``peak * s^(1/p)`` can overflow
    where ``inv`` brings it back: there the product is formed in log space."""
    root = s.pow(1.0 / p)
    product = peak * root
    direct = product if inv is None else product * inv
    log_inv = 0.0 if inv is None else inv.log()
    logged = torch.exp(peak.log() + s.log() / p + log_inv)
    return torch.where(torch.isfinite(product) & (root >= _TINY), direct, logged)


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


def kernels_take_norm_type(norm_type: float) -> bool:
    """Whether the passes compute this norm type: p > 0, or inf. The others torch accepts (0,
    negative p, -inf) take ``general_norm``; NaN is refused before (``fusedclip._args``)."""
    return norm_type > 0


def _magnitudes(t: Tensor) -> Tensor:
    """|elements| in fp64: a sparse tensor's coalesced values, a complex one's moduli."""
    v = t.detach()
    if v.is_sparse:
        v = v.coalesce().values()
    if v.is_complex():
        v = v.to(torch.complex128)  # |z| of a complex64 is a rounded result: widen first
    return v.abs().to(torch.float64)


def _scaled_negative_norm(values: Tensor, p: float) -> Tensor:
    """``(sum |x|^p)^(1/p)`` for p < 0 in fp64, divided by the smallest magnitude first so that no
    power overflows (and finished by ``root_norm``, so that ``sum^(1/p)`` cannot underflow): 0
    when some |x| is 0, inf when all are inf, NaN when any is NaN."""
    low = values.amin()  # NaN when any is NaN
    scale = torch.where(torch.isfinite(low) & (low > 0), low, 1.0)
    norm = root_norm(scale, (values / scale).pow(p).sum(), p)
    return torch.where(torch.isnan(low) | (low == 0), low, norm)


def _first_index(tensors: list[Tensor], on_meta: bool) -> int | None:
    # A loop, not next(generator, None): torch 2.6's torch.compile breaks the graph on the latter.
    for i, t in enumerate(tensors):
        if (t.device.type == "meta") == on_meta:
            return i
    return None


def refuse_meta_beside_data(tensors: list[Tensor]) -> None:
    """A meta tensor holds no values: its norm cannot join the norms of tensors that do (torch
    fails there with "Cannot copy out of meta tensor"). Raises naming both devices; a list all on
    meta is fine (its norm is a meta tensor)."""
    meta = _first_index(tensors, on_meta=True)
    if meta is None:
        return
    other = _first_index(tensors, on_meta=False)
    if other is not None:
        raise RuntimeError(
            f"gradients[{meta}] is on meta and gradients[{other}] on {tensors[other].device}: a "
            "meta tensor holds no values, so its norm cannot be combined with the others' (with "
            "every gradient on meta, the norm is a meta tensor)"
        )


def general_norm(tensors: list[Tensor], norm_type: float) -> Tensor:
    """The norms the passes do not take, as ``torch.nn.utils.get_total_norm`` defines them (the
    norm of the per-tensor norms), computed in fp64: fp64 0-dim on ``tensors[0]``'s device.

    p = 0 counts, per tensor, the elements that are not 0 (NaN counts), then the tensors whose count
    is not 0. p < 0 is ``(sum |x|^p)^(1/p)`` over all elements, so one zero makes it 0 (an
    infinite element adds nothing); -inf is the smallest magnitude. As in torch, an
    empty tensor has no p < 0 or -inf norm (no identity for the reduction): a ``RuntimeError``.
    """
    refuse_meta_beside_data(tensors)
    device = tensors[0].device
    if norm_type < 0 and any(t.numel() == 0 for t in tensors):
        raise RuntimeError(
            f"linalg.vector_norm cannot compute the {norm_type} norm on an empty tensor because "
            "the operation does not have an identity"
        )
    per = []
    for t in tensors:
        values = _magnitudes(t)
        if norm_type == 0:
            per.append((values != 0).sum().to(torch.float64))
        elif math.isinf(norm_type):
            per.append(values.amin())
        else:
            per.append(_scaled_negative_norm(values, norm_type))
    norms = torch.stack([n.to(device) for n in per])
    if norm_type == 0:
        return (norms != 0).sum().to(torch.float64)
    if math.isinf(norm_type):
        return norms.amin()
    return _scaled_negative_norm(norms, norm_type)


def combine_norms(norms: list[Tensor], norm_type: float) -> Tensor:
    """The p-norm of the union of disjoint sets of elements, from each set's p-norm (0-dim, any
    devices): fp64 on ``norms[0]``'s device. NaN if any is NaN, else inf if any is inf; finite norms
    are divided by the largest first, so their powers cannot overflow (nor the root:
    ``root_norm``)."""
    device = norms[0].device
    stacked = torch.stack([n.to(device=device, dtype=torch.float64).reshape(()) for n in norms])
    peak = stacked.amax()  # NaN when any is NaN
    if math.isinf(norm_type):
        return peak
    scale = torch.where(torch.isfinite(peak) & (peak > 0), peak, 1.0)
    total = root_norm(scale, ratio_pow(stacked, scale, norm_type).sum(), norm_type)
    return torch.where(torch.isfinite(peak), total, peak)
