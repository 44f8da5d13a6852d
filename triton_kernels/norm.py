"""Pass 1 of the clip in Triton: per-chunk partials, then the total norm and the coefficient.

The table is the one the C++ engine uses (csrc/engine/table.h, read through table.py). A partial
is a pair (m, s): m = max |x| over the chunk and s = sum (|x| / m)^p, so nothing overflows or
underflows for any p; m is NaN once any element is NaN, else inf once any is infinite. A plain fp64
sum of |x|^p (p = 1 or 2 on fp16/bf16/fp32, which no finite input can overflow) enters as (1, sum).

Kernels and their passes over memory:
- ``chunk_partials``: one read of every element of one dtype group (one program per chunk), one
  (m, s) pair written per chunk.
- ``finish``: one program reads the C partials (16 bytes per 128 KiB of gradients), twice, in a
  fixed order, and writes the norm, the coefficient and the norm in its returned dtype; on the
  AMP path it also unscales the norm and sets the found-inf flag.
- ``per_tensor_norms``: one program per tensor over its own chunks' partials (only when asked).
- ``tensor_partials``: the same, writing each tensor's (m, s) instead of its norm (the partials
  ``BackwardClipper`` keeps per gradient; ``finish`` over them later is the rest of pass 1).
Everything is in a fixed order: the results are bitwise identical from run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .convert import round_fp32_to
from .table import f64, program_chunk

BLOCK = 4096  # elements per tile of a chunk
FBLOCK = 1024  # partials per tile of the final reduction

KIND_ONE, KIND_TWO, KIND_INF, KIND_GENERAL = 0, 1, 2, 3
NORM_EPS = 1e-6


def norm_kind(p: float) -> int:
    if p == 1.0:
        return KIND_ONE
    if p == 2.0:
        return KIND_TWO
    if p == float("inf"):
        return KIND_INF
    return KIND_GENERAL


@triton.jit
def _ratio_pow(b, a, p, KIND: tl.constexpr):
    """(b / a)^p for 0 <= b <= a, 0 < a < inf (fp64; csrc/engine/norm_math.h ratio_pow). For
    general p from the logs of b and a, not of the ratio: a ratio below the normal range has lost
    bits or flushed to 0, yet for p < 1 its power is not negligible ((1e-400)^0.01 = 1e-4)."""
    if KIND == 1:
        out = (b / a) * (b / a)
    elif KIND == 0:
        out = b / a
    else:
        out = tl.where(b > 0, tl.exp(p * (tl.log(tl.where(b > 0, b, 1.0)) - tl.log(a))), 0.0)
    return out


@triton.jit
def _nan_max(a):
    """max over a 1-D fp64 block, NaN if any element is NaN (tl.max may drop NaNs)."""
    has_nan = tl.max((a != a).to(tl.int32), axis=0)
    m = tl.max(tl.where(a != a, 0.0, a), axis=0)
    return tl.where(has_nan > 0, float("nan"), m)


@triton.jit
def _nan_maximum(a, b):
    """max(a, b), NaN if either is (tl.maximum leaves NaN handling to the hardware)."""
    return tl.where((a != a) | (b != b), float("nan"), tl.maximum(a, b))


@triton.jit
def _tile(ptr, idx, mask, DT: tl.constexpr, MASKED: tl.constexpr):
    """|x| of one tile as fp64 (0 where masked off)."""
    if MASKED:
        x = tl.load(ptr + idx, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + idx)
    if DT == tl.float64:
        a = tl.abs(x)
    else:
        a = tl.abs(x.to(tl.float32)).to(tl.float64)
    return a


@triton.jit
def _add_tile(m, s, a, p, KIND: tl.constexpr):
    """Folds a tile of magnitudes into a chunk's scaled pair (m, s) (fp64 p = 1, 2; general p)."""
    tm = _nan_max(a)
    ts = tl.sum(tl.where(a > 0, _ratio_pow(a, tl.where(tm > 0, tm, 1.0), p, KIND), 0.0), axis=0)
    big = tl.maximum(m, tm)
    safe = tl.where(big > 0, big, 1.0)
    s = tl.where(m > 0, s * _ratio_pow(m, safe, p, KIND), 0.0) + \
        tl.where(tm > 0, ts * _ratio_pow(tm, safe, p, KIND), 0.0)
    m = _nan_maximum(m, tm)
    return m, s


@triton.jit
def _rows(ptr, idx, mask, MASKED: tl.constexpr):
    """A [ROWS, VEC] tile at ``ptr + idx``; a MASKED one with a mask constant along each row of
    VEC elements (16 bytes), so that it still compiles to 16-byte loads."""
    if MASKED:
        x = tl.load(ptr + idx, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + idx)
    return x


@triton.jit
def _fold_rows(acc, x, KIND: tl.constexpr, DT: tl.constexpr):
    """Folds a [ROWS, VEC] tile into the per-row state ``acc`` [ROWS]: for p = 1, 2 the fp64 sum
    of |x|^p over each row (summed within a thread: a row is one thread's 16-byte vector); for
    p = inf the max of the magnitude bits as integers (int64 for fp64, int32 for the others): exact,
    and NaN-sticky (a NaN's magnitude bits exceed inf's, whatever its payload), with no fp64."""
    if KIND == 2:
        if DT == tl.float64:
            bits = x.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
        elif DT == tl.float32:
            bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        else:
            bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        acc = tl.maximum(acc, tl.max(bits, axis=1))
    else:
        a = tl.abs(x.to(tl.float32)).to(tl.float64)
        if KIND == 1:
            a = a * a
        acc += tl.sum(a, axis=1)
    return acc


@triton.jit
def _magnitude_of_bits(bits, DT: tl.constexpr):
    """The fp64 value of the magnitude bits ``bits`` of a DT element."""
    if DT == tl.float64:
        m = bits.to(tl.float64, bitcast=True)
    elif DT == tl.float32:
        m = bits.to(tl.float32, bitcast=True).to(tl.float64)
    else:
        m = bits.to(tl.int16).to(DT, bitcast=True).to(tl.float32).to(tl.float64)
    return m


@triton.jit
def _fast_partial(ptr, begin, n, DT: tl.constexpr, KIND: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr, VEC: tl.constexpr, DEPTH: tl.constexpr):
    """The partial (m, s) of one chunk for p = 1, 2 on fp16/bf16/fp32 and p = inf on any dtype:
    one read, tiles of BLOCK elements as [BLOCK // VEC, VEC] (a row is one 16-byte vector),
    DEPTH tiles loaded before the first is folded (loads in flight), a per-row accumulator."""
    ROWS: tl.constexpr = BLOCK // VEC
    rows = tl.arange(0, ROWS).to(tl.int64)[:, None] * VEC
    idx = rows + tl.arange(0, VEC).to(tl.int64)[None, :]
    if KIND == 2:
        if DT == tl.float64:
            acc = tl.zeros([ROWS], tl.int64)
        else:
            acc = tl.zeros([ROWS], tl.int32)
    else:
        acc = tl.zeros([ROWS], tl.float64)
    base = ptr + begin
    for i in range(0, CHUNK, DEPTH * BLOCK):  # constant trip count: compiles and interprets alike
        if i + DEPTH * BLOCK <= n:  # full tiles: unmasked, every load issued before any use
            x0 = _rows(base + i, idx, None, False)
            if DEPTH == 2:
                x1 = _rows(base + i + BLOCK, idx, None, False)
                acc = _fold_rows(acc, x0, KIND, DT)
                acc = _fold_rows(acc, x1, KIND, DT)
            else:
                acc = _fold_rows(acc, x0, KIND, DT)
        elif i < n:
            # The chunk's last tiles: rows wholly inside n are loaded as vectors (a mask constant
            # along each row), then the last n % VEC elements one by one.
            full = n // VEC * VEC
            for j in range(0, DEPTH * BLOCK, BLOCK):
                x = _rows(base + i + j, idx, (i + j + rows) < full, True)
                acc = _fold_rows(acc, x, KIND, DT)
            if full < n:
                x = _rows(base + full, idx, idx < n - full, True)
                acc = _fold_rows(acc, x, KIND, DT)
    if KIND == 2:
        m = _magnitude_of_bits(tl.max(acc, axis=0), DT)
        s = tl.zeros((), tl.float64)
    else:
        s = tl.sum(acc, axis=0)
        # (1, s), or the sum itself when it is 0, NaN or inf
        bad = (s != s) | (s == float("inf")) | (s == 0.0)
        m = tl.where(bad, s, 1.0)
        s = tl.where(bad, 0.0, s)
    return m, s


# Runtime integers are never specialised: Triton would otherwise compile a value of 1 as a constant
# (breaking the fp64 bitcast of p_bits and max_norm_bits) and compile new variants, mid-run or
# inside a graph capture, whenever a value happens to be 1 or a multiple of 16.
@triton.jit(do_not_specialize=["n_tensors", "chunk_lo", "p_bits"])
def chunk_partials(
    table, n_tensors, chunk_lo, partials, p_bits,
    DT: tl.constexpr, KIND: tl.constexpr, PLAIN: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, DEPTH: tl.constexpr,
):
    """Pass 1, one read: chunk c's partial (m, s) into partials[2c], partials[2c + 1].

    PLAIN (p = 1, 2 on fp16/bf16/fp32) and p = inf take ``_fast_partial``: rows of one 16-byte
    vector, DEPTH tiles in flight, a narrow per-row accumulator (few registers, so ptxas issues
    every load of a tile before its first use). fp64 p = 1, 2 and general p take the scaled pair
    (a running (m, s) per tile of BLOCK elements: block reductions, an fp64 divide per element)."""
    p = f64(p_bits)
    c, _, ptr, begin, n = program_chunk(table, n_tensors, chunk_lo, DT, ALIGNED, CHUNK)
    if PLAIN or KIND == 2:
        m, s = _fast_partial(ptr, begin, n, DT, KIND, CHUNK, BLOCK, VEC, DEPTH)
    else:
        offs = tl.arange(0, BLOCK).to(tl.int64)
        m = tl.zeros((), tl.float64)
        s = tl.zeros((), tl.float64)
        for i in range(0, CHUNK, BLOCK):  # constant trip count: compiles and interprets the same
            if i + BLOCK <= n:  # a full tile: unmasked, so the loads vectorize
                a = _tile(ptr, begin + i + offs, None, DT, False)
                m, s = _add_tile(m, s, a, p, KIND)
            elif i < n:
                idx = i + offs
                a = _tile(ptr, begin + idx, idx < n, DT, True)
                m, s = _add_tile(m, s, a, p, KIND)
    tl.store(partials + 2 * c, m)
    tl.store(partials + 2 * c + 1, s)


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
        big = _nan_maximum(big, _nan_max(tl.load(partials + 2 * idx, mask=idx < hi, other=0.0)))
        i += FBLOCK
    total = tl.zeros((), tl.float64)
    if KIND != 2:
        safe = tl.where(big > 0, big, 1.0)
        i = lo
        while i < hi:
            idx = i + offs
            mi = tl.load(partials + 2 * idx, mask=idx < hi, other=0.0)
            si = tl.load(partials + 2 * idx + 1, mask=idx < hi, other=0.0)
            term = tl.where(mi == big, si, si * _ratio_pow(mi, safe, p, KIND))
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
