"""Pass 1 of the clip in Triton: one read of the gradients, one partial (m, s) per chunk.

The table is the one the C++ engine uses (csrc/engine/table.h, read through table.py). A partial
is a pair (m, s) (pair.py): m = max |x| over the chunk and s = sum (|x| / m)^p, so nothing
overflows or underflows for any p; m is NaN once any element is NaN, else inf once any is
infinite. A plain fp64 sum of |x|^p (p = 1 or 2 on fp16/bf16/fp32, which no finite input can
overflow) enters as (1, sum). finish.py combines the partials into the norm and the coefficient.

``chunk_partials`` makes one read of every element of one dtype group (one program per chunk) and
writes one (m, s) pair per chunk. Everything is in a fixed order: the results are bitwise
identical from run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pair import nan_max, nan_maximum, ratio_pow
from .table import f64, program_chunk

BLOCK = 4096  # elements per tile of the scaled pair's chunks (fp64 p = 1, 2; general p)


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
    tm = nan_max(a)
    ts = tl.sum(tl.where(a > 0, ratio_pow(a, tl.where(tm > 0, tm, 1.0), p, KIND), 0.0), axis=0)
    big = tl.maximum(m, tm)
    safe = tl.where(big > 0, big, 1.0)
    s = tl.where(m > 0, s * ratio_pow(m, safe, p, KIND), 0.0) + \
        tl.where(tm > 0, ts * ratio_pow(tm, safe, p, KIND), 0.0)
    m = nan_maximum(m, tm)
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
