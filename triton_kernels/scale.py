"""Pass 2 of the clip in Triton: rescale every tensor of a dtype group in place.

``scale``: one program per chunk (the table of csrc/table.h). It reads the fp64 coefficient on
the device; when it is exactly 1 the program returns without touching the gradients (the whole
clip then costs pass 1's single read), otherwise it makes one read and one write of each element.
The product is formed in fp64 and rounded to the gradient's dtype through fp32, as the reference
and the CUDA kernel do.
"""

from __future__ import annotations

import triton
import triton.language as tl
from fusedclip.triton_kernels.convert import round_fp32_to
from fusedclip.triton_kernels.table import program_chunk


@triton.jit
def _scaled(x, c, DT: tl.constexpr):
    if DT == tl.float64:
        y = x * c
    else:
        y = round_fp32_to((x.to(tl.float64) * c).to(tl.float32), DT)
    return y


@triton.jit(do_not_specialize=["n_tensors", "chunk_lo"])  # see norm.chunk_partials
def scale(
    table, n_tensors, chunk_lo, coef_ptr,
    DT: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.load(coef_ptr)
    if c != 1.0:
        _, ptr, begin, n = program_chunk(table, n_tensors, chunk_lo, DT, ALIGNED, CHUNK)
        offs = tl.arange(0, BLOCK).to(tl.int64)
        for i in range(0, CHUNK, BLOCK):  # constant trip count: compiles and interprets alike
            idx = begin + i + offs
            if i + BLOCK <= n:  # a full tile: unmasked, so the accesses vectorize
                tl.store(ptr + idx, _scaled(tl.load(ptr + idx), c, DT))
            elif i < n:
                mask = i + offs < n
                x = tl.load(ptr + idx, mask=mask, other=0.0)
                tl.store(ptr + idx, _scaled(x, c, DT), mask=mask)
