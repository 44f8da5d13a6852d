"""The in-place kernels of one read and one write: pass 2 of the clip (``scale``) and value
clipping (``clamp``); one program per chunk (the table of csrc/engine/table.h), both walking the
chunk as ``_rewrite_chunk`` does.

``scale`` reads the fp64 coefficient on the device; when it is exactly 1 the program returns
without touching the gradients (the whole clip then costs pass 1's single read), otherwise it
makes one read and one write of each element. The product is formed in fp64 and rounded to the
gradient's dtype through fp32, as the reference and the CUDA kernel do.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .convert import round_fp32_to
from .table import chunk_at, f64, program_chunk


@triton.jit
def _scaled(x, c, DT: tl.constexpr):
    if DT == tl.float64:
        y = x * c
    else:
        y = round_fp32_to((x.to(tl.float64) * c).to(tl.float32), DT)
    return y


@triton.jit
def _rewritten(x, c, bound, neg_bound, DT: tl.constexpr, OP: tl.constexpr,
               CUDA_RULE: tl.constexpr):
    if OP == 0:
        y = _scaled(x, c, DT)
    else:
        y = _clamped(x, bound, neg_bound, DT, CUDA_RULE)
    return y


@triton.jit
def _rewrite_chunk(ptr, begin, n, c, bound, neg_bound, DT: tl.constexpr, OP: tl.constexpr,
                   CUDA_RULE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   VEC: tl.constexpr, DEPTH: tl.constexpr):
    """One read and one write of each of the chunk's n elements at ``ptr + begin``: OP 0 scales
    by c, OP 1 clamps. Tiles of BLOCK elements as [BLOCK // VEC, VEC] (a row is one 16-byte
    vector); DEPTH full tiles are loaded before the first is stored (loads in flight); in the last
    tiles the rows wholly inside n stay 16-byte accesses (a mask constant along each row) and only
    the last n % VEC elements go one by one."""
    ROWS: tl.constexpr = BLOCK // VEC
    rows = tl.arange(0, ROWS).to(tl.int64)[:, None] * VEC
    idx = rows + tl.arange(0, VEC).to(tl.int64)[None, :]
    base = ptr + begin
    for i in range(0, CHUNK, DEPTH * BLOCK):  # constant trip count: compiles and interprets alike
        if i + DEPTH * BLOCK <= n:  # full tiles: unmasked, so the accesses vectorize
            x0 = tl.load(base + i + idx)
            if DEPTH == 2:
                x1 = tl.load(base + i + BLOCK + idx)
                tl.store(base + i + idx, _rewritten(x0, c, bound, neg_bound, DT, OP, CUDA_RULE))
                tl.store(base + i + BLOCK + idx,
                         _rewritten(x1, c, bound, neg_bound, DT, OP, CUDA_RULE))
            else:
                tl.store(base + i + idx, _rewritten(x0, c, bound, neg_bound, DT, OP, CUDA_RULE))
        elif i < n:
            full = n // VEC * VEC
            for j in range(0, DEPTH * BLOCK, BLOCK):
                mask = (i + j + rows) < full
                x = tl.load(base + i + j + idx, mask=mask, other=0.0)
                tl.store(base + i + j + idx, _rewritten(x, c, bound, neg_bound, DT, OP, CUDA_RULE),
                         mask=mask)
            if full < n:
                mask = idx < n - full
                x = tl.load(base + full + idx, mask=mask, other=0.0)
                tl.store(base + full + idx, _rewritten(x, c, bound, neg_bound, DT, OP, CUDA_RULE),
                         mask=mask)


@triton.jit
def _scale_chunks(table, n_tensors, chunk_lo, chunk_hi, coef_ptr, coef, DT: tl.constexpr,
                  ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  PER_TENSOR: tl.constexpr, VEC: tl.constexpr, DEPTH: tl.constexpr):
    """This program's chunks, chunk_lo + program_id, then every num_programs-th up to chunk_hi,
    each times its coefficient (coef, or coef_ptr[t] with PER_TENSOR) unless that is 1."""
    c = chunk_lo + tl.program_id(0).to(tl.int64)
    while c < chunk_hi:  # a while loop: the interpreter runs no runtime-bounded range
        t, ptr, begin, n = chunk_at(table, n_tensors, c, DT, ALIGNED, CHUNK)
        if PER_TENSOR:
            k = tl.load(coef_ptr + t)
        else:
            k = coef
        if k != 1.0:
            _rewrite_chunk(ptr, begin, n, k, k, k, DT, 0, False, CHUNK, BLOCK, VEC, DEPTH)
        c += tl.num_programs(0)


@triton.jit(do_not_specialize=["n_tensors", "chunk_lo", "chunk_hi"])  # see norm.chunk_partials
def scale(
    table, n_tensors, chunk_lo, chunk_hi, coef_ptr,
    DT: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    PER_TENSOR: tl.constexpr, VEC: tl.constexpr, DEPTH: tl.constexpr,
):
    """Pass 2: chunks [chunk_lo, chunk_hi) times their coefficient, coef_ptr[0], or with
    PER_TENSOR coef_ptr[t] for a chunk's tensor t; a chunk whose coefficient is exactly 1 is left
    untouched (no pass over memory), otherwise one read and one write (``_rewrite_chunk``). The
    grid may be smaller than the chunk count (persistent programs, ``Variant.persist``): with one
    coefficient of 1 each program then loads it once and returns."""
    if PER_TENSOR:
        _scale_chunks(table, n_tensors, chunk_lo, chunk_hi, coef_ptr, 1.0, DT, ALIGNED, CHUNK,
                      BLOCK, PER_TENSOR, VEC, DEPTH)
    else:
        coef = tl.load(coef_ptr)
        if coef != 1.0:
            _scale_chunks(table, n_tensors, chunk_lo, chunk_hi, coef_ptr, coef, DT, ALIGNED,
                          CHUNK, BLOCK, PER_TENSOR, VEC, DEPTH)


@triton.jit
def _clamped(x, bound, neg_bound, DT: tl.constexpr, CUDA_RULE: tl.constexpr):
    """x clamped to [neg_bound, bound] (both exact in DT, neg_bound = -bound) as torch's clamp_min
    then clamp_max on the tensors' device: NaN stays NaN and an element inside the bounds keeps
    its bits. With bound 0 torch's CPU kernels give -0.0 for negative elements, its CUDA foreach
    kernels +0.0 for all (CUDA_RULE); csrc/engine/norm_math.h clamped."""
    # Both bounds come from the host as they are: Triton's interpreters have negated a +0 into
    # +0 (bf16 in 3.8, fp32 in 3.6), where torch clamps to -0.0.
    if DT == tl.float64:
        v = x
        hi = bound
        lo = neg_bound
    else:
        v = x.to(tl.float32)
        hi = bound.to(tl.float32)
        lo = neg_bound.to(tl.float32)
    top = hi.to(DT)
    bottom = lo.to(DT)
    if CUDA_RULE:
        # minimum(maximum(x, lo), hi) with torch's CUDA operand order: a tie takes the bound
        y = tl.where((v != v) | (v > lo), x, bottom)
        w = tl.where(v != v, v, tl.where(v > lo, v, lo))
        y = tl.where((w != w) | (w < hi), y, top)
    else:
        y = tl.where(v < lo, bottom, tl.where(v > hi, top, x))
    return y


@triton.jit(do_not_specialize=["n_tensors", "chunk_lo", "bound_bits", "neg_bound_bits"])
def clamp(
    table, n_tensors, chunk_lo, bound_bits, neg_bound_bits,
    DT: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    CUDA_RULE: tl.constexpr, VEC: tl.constexpr, DEPTH: tl.constexpr,
):
    """Value clipping: one read and one write of each element of the chunk (torch's foreach path
    makes two passes, clamp_min then clamp_max). bound_bits: the fp64 bits of the bound, already
    rounded to DT as torch rounds a Python bound; neg_bound_bits: those of its negation."""
    bound = f64(bound_bits)
    neg_bound = f64(neg_bound_bits)
    _, _, ptr, begin, n = program_chunk(table, n_tensors, chunk_lo, DT, ALIGNED, CHUNK)
    _rewrite_chunk(ptr, begin, n, bound, bound, neg_bound, DT, 1, CUDA_RULE, CHUNK, BLOCK, VEC,
                   DEPTH)
