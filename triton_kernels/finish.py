"""The rest of pass 1 in Triton: the chunk partials (norm.py) combined, in a fixed order, into the
total norm and the clip coefficient, per-tensor norms and coefficients, or per-tensor partials.
None of these kernels reads the gradients: they read the partials, 16 bytes per 128 KiB.

- ``finish``: one program reads the C partials twice (their max, then the sum relative to it) and
  writes the norm, the coefficient and the norm in its returned dtype; on the AMP path it also
  unscales the norm and sets the found-inf flag.
- ``per_tensor_norms``: one program per tensor over its own chunks' partials (only when asked).
- ``tensor_partials``: the same, writing each tensor's (m, s) instead of its norm (the partials
  ``BackwardClipper`` keeps per gradient; ``finish`` over them later is the rest of pass 1).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .convert import round_fp32_to
from .pair import nan_max, nan_maximum, ratio_pow
from .table import f64

FBLOCK = 1024  # partials per tile of the final reduction


@triton.jit
def _partial_of_range(partials, lo, hi, p, KIND: tl.constexpr, FBLOCK: tl.constexpr):
    """The partial (m, s) of the elements of chunks [lo, hi): m the max of their m (non-finite
    exactly when an element was), then s the sum of s * (m / max)^p, both in a fixed order."""
    # while loops: a runtime-bounded range does not run in Triton 3.6's interpreter.
    offs = tl.arange(0, FBLOCK).to(tl.int64)
    big = tl.zeros((), tl.float64)
    i = lo
    while i < hi:
        idx = i + offs
        big = nan_maximum(big, nan_max(tl.load(partials + 2 * idx, mask=idx < hi, other=0.0)))
        i += FBLOCK
    total = tl.zeros((), tl.float64)
    if KIND != 2:
        safe = tl.where(big > 0, big, 1.0)
        i = lo
        while i < hi:
            idx = i + offs
            mi = tl.load(partials + 2 * idx, mask=idx < hi, other=0.0)
            si = tl.load(partials + 2 * idx + 1, mask=idx < hi, other=0.0)
            term = tl.where(mi == big, si, si * ratio_pow(mi, safe, p, KIND))
            total += tl.sum(tl.where(mi > 0, term, 0.0), axis=0)
            i += FBLOCK
    return big, total


@triton.jit
def _finish_norm(big, total, p, inv, KIND: tl.constexpr):
    """The norm a partial (big, total) describes, times inv (csrc/engine/norm_math.h
    finish_norm): big * total^(1/p) * inv, or big * inv when big is 0, inf or NaN. Where the
    product overflows (total^(1/p) does for a small p long before big brings it back) it is formed
    in log space, finite wherever the norm is."""
    finite = (big == big) & (big != float("inf")) & (big > 0)
    if KIND == 2:
        norm = big * inv
    else:
        m = tl.where(finite, big, 1.0)
        s = tl.where(total > 0, total, 1.0)
        if KIND == 1:
            root = tl.sqrt(s)
        elif KIND == 0:
            root = s
        else:
            root = tl.exp(tl.log(s) / p)
        direct = m * root
        logged = tl.exp(tl.log(m) + tl.log(s) / p + tl.log(inv))
        norm = tl.where(finite, tl.where(direct != float("inf"), direct * inv, logged), big * inv)
    return norm


@triton.jit
def _combine_range(partials, lo, hi, p, inv, KIND: tl.constexpr, FBLOCK: tl.constexpr):
    """The norm described by the partials of chunks [lo, hi) times inv, and their largest m."""
    big, total = _partial_of_range(partials, lo, hi, p, KIND, FBLOCK)
    return _finish_norm(big, total, p, inv, KIND), big


@triton.jit
def _inverse_scale(inv_ptr, UNSCALE: tl.constexpr):
    """The inverse loss scale as fp64 (1 without one): norms of x * inv are inv * norms of x."""
    if UNSCALE:
        inv = tl.load(inv_ptr).to(tl.float64)
    else:
        inv = tl.full((), 1.0, tl.float64)
    return inv


MODE_HARD, MODE_SOFT, MODE_ADAPTIVE = 0, 1, 2


@triton.jit
def _clip_coef(norm, max_norm, MODE: tl.constexpr):
    """The coefficient of ``norm`` under ``max_norm`` (csrc/engine/norm_math.h clip_coef): hard
    min(1, max_norm / (norm + 1e-6)), NaN staying NaN as with torch's clamp; soft
    max_norm / (norm + max_norm), 1 where the norm is 0 or max_norm inf; adaptive (AGC) 1 under
    max_norm, else max_norm / max(norm, 1e-6)."""
    if MODE == 2:
        c = tl.where(norm < max_norm, 1.0, max_norm / tl.where(norm < 1e-6, 1e-6, norm))
    elif MODE == 1:
        c = max_norm / (norm + max_norm)
        c = tl.where((norm == 0.0) | (max_norm == float("inf")), 1.0, c)
        c = tl.where(norm != norm, norm, c)
    else:
        c = max_norm / (norm + 1e-6)
        c = tl.where(c > 1.0, 1.0, c)
    return c


@triton.jit(do_not_specialize=["num_chunks", "p_bits", "max_norm_bits"])
def finish(
    partials, num_chunks, p_bits, max_norm_bits, norm_ptr, coef_ptr, out_ptr, inv_ptr, found_ptr,
    KIND: tl.constexpr, OUT_DT: tl.constexpr, FBLOCK: tl.constexpr, UNSCALE: tl.constexpr,
    FLAG: tl.constexpr, MODE: tl.constexpr,
):
    """The rest of pass 1, one program: two passes over the C partials (the max of their m, then
    the sum relative to it: 16 bytes per 128 KiB of gradients, so no pass over the gradients),
    then the norm, the coefficient and the norm in OUT_DT. With UNSCALE (the AMP path) the
    gradients hold loss-scaled values: the norm is that of the unscaled ones and the coefficient
    also unscales (inv * min(1, ...)). With FLAG, found_ptr (fp32) is set to 1 when any element
    was inf or NaN and left alone otherwise."""
    p = f64(p_bits)
    max_norm = f64(max_norm_bits)
    inv = _inverse_scale(inv_ptr, UNSCALE)
    norm, big = _combine_range(partials, 0, num_chunks, p, inv, KIND, FBLOCK)
    tl.store(norm_ptr, norm)
    tl.store(coef_ptr, _clip_coef(norm, max_norm, MODE) * inv)
    if FLAG:
        nonfinite = (big != big) | (big == float("inf"))
        # Read, then written back unchanged unless set (one program): Triton 3.2's interpreter
        # ignores the mask of a 0-d store.
        tl.store(found_ptr, tl.where(nonfinite, 1.0, tl.load(found_ptr)))
    if OUT_DT == tl.float64:
        tl.store(out_ptr, norm)
    else:
        tl.store(out_ptr, round_fp32_to(norm.to(tl.float32), OUT_DT))


@triton.jit(do_not_specialize=["n_tensors", "p_bits", "max_norm_bits", "eps_bits", "factor_bits"])
def per_tensor_norms(
    table, n_tensors, partials, p_bits, out_ptr, inv_ptr, max_norms_ptr, coef_ptr, max_norm_bits,
    eps_bits, factor_bits, KIND: tl.constexpr, CHUNK: tl.constexpr, FBLOCK: tl.constexpr,
    UNSCALE: tl.constexpr, COEF: tl.constexpr, MODE: tl.constexpr,
):
    """Tensor t's norm into out_ptr[t] (one program per tensor, two passes over its own chunks'
    partials, none over the gradients); COEF 1 (one threshold, max_norm_bits) or 2 (thresholds
    max_norms_ptr[t]) also writes its clip coefficient into coef_ptr[t]. MODE 2 (adaptive
    clipping): max_norms_ptr holds the parameters' unit norms, and the threshold is
    max(that, eps) * factor."""
    p = f64(p_bits)
    t = tl.program_id(0).to(tl.int64)
    numel = tl.load(table + n_tensors + t)
    first = tl.load(table + 2 * n_tensors + t)
    n_chunks = (numel + CHUNK - 1) // CHUNK
    inv = _inverse_scale(inv_ptr, UNSCALE)
    norm, _ = _combine_range(partials, first, first + n_chunks, p, inv, KIND, FBLOCK)
    tl.store(out_ptr + t, norm)
    if COEF == 1:
        tl.store(coef_ptr + t, _clip_coef(norm, f64(max_norm_bits), MODE) * inv)
    elif COEF == 2:
        limit = tl.load(max_norms_ptr + t)
        if MODE == 2:
            eps = f64(eps_bits)
            limit = tl.where(limit < eps, eps, limit) * f64(factor_bits)  # NaN stays NaN
        tl.store(coef_ptr + t, _clip_coef(norm, limit, MODE) * inv)


@triton.jit(do_not_specialize=["n_tensors", "p_bits"])
def tensor_partials(
    table, n_tensors, partials, p_bits, out_ptr,
    KIND: tl.constexpr, CHUNK: tl.constexpr, FBLOCK: tl.constexpr,
):
    """Tensor t's own partial (m, s) into out_ptr[2t], out_ptr[2t + 1] (one program per tensor,
    two passes over its chunks' partials; BackwardClipper's slots: ``finish`` combines them later
    as it combines chunk partials)."""
    p = f64(p_bits)
    t = tl.program_id(0).to(tl.int64)
    numel = tl.load(table + n_tensors + t)
    first = tl.load(table + 2 * n_tensors + t)
    big, total = _partial_of_range(partials, first, first + (numel + CHUNK - 1) // CHUNK, p, KIND,
                                   FBLOCK)
    tl.store(out_ptr + 2 * t, big)
    tl.store(out_ptr + 2 * t + 1, total)
