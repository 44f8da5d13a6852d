"""The tensor table of a plan, read from Triton (the layout of csrc/engine/table.h).

One int64 array: ``addr[T]``, ``numel[T]``, ``first_chunk[T]``, ``chunk_tensor[C]``; a chunk is
``CHUNK`` consecutive elements of one tensor (a compile-time argument of every kernel:
``fusedclip.backends.triton.plan.CHUNK``). Each program of a pass takes one chunk of its dtype
group, ``chunk_lo + program_id``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def f64(bits):
    """The fp64 whose bits are the int64 ``bits`` (Triton passes Python floats as fp32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def program_chunk(table, n_tensors, chunk_lo, DT: tl.constexpr, ALIGNED: tl.constexpr,
                  CHUNK: tl.constexpr):
    """This program's chunk: its index, its tensor's index and base pointer (with a 16-byte
    alignment hint when the group is ALIGNED), its first element and its element count."""
    c = chunk_lo + tl.program_id(0).to(tl.int64)
    t, ptr, begin, n = chunk_at(table, n_tensors, c, DT, ALIGNED, CHUNK)
    return c, t, ptr, begin, n


@triton.jit
def chunk_at(table, n_tensors, c, DT: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """Chunk c's tensor index, base pointer (16-byte hint when ALIGNED), first element and
    element count."""
    t = tl.load(table + 3 * n_tensors + c)
    begin = (c - tl.load(table + 2 * n_tensors + t)) * CHUNK
    n = tl.minimum(tl.load(table + n_tensors + t) - begin, CHUNK)
    ptr = tl.load(table + t).to(tl.pointer_type(DT))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return t, ptr, begin, n
