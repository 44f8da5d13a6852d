"""Rounding fp32 to a gradient dtype the same way on the GPU and in Triton's CPU interpreter.

The interpreter truncates fp32 to bf16 (numpy has no bf16), where the GPU and torch round to
nearest-even; so bf16 is rounded here with integer operations (torch's rounding, NaN made quiet),
a handful of ALU instructions per element in a memory-bound kernel. fp16 and fp32 convert
directly (round to nearest-even on both).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_fp32_to(x, DT: tl.constexpr):
    """``x`` (fp32) rounded to DT, to nearest-even."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        half = tl.where(x != x, 0x7FC0, bits >> 16).to(tl.uint16)
        out = half.to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DT)
    return out
