"""Rounding fp32 to a gradient dtype the same way on the GPU and in Triton's CPU interpreter.

On the GPU every dtype converts natively (``cvt.rn``: round to nearest-even, subnormals kept,
inf kept, NaN stays NaN, as torch's CUDA conversion; a bf16 NaN comes out as 0x7FFF, torch's CUDA
bits). The interpreter truncates fp32 to bf16 (numpy has no bf16), so there (``INTERPRETED``)
bf16 is rounded with integer operations (``_round_integer``): torch's rounding, NaN made quiet
(0x7FC0, torch's CPU bits). On sm_90 that path cost pass 2 about 5.5 integer instructions per
element and 92 registers against the native one's 57 (docs/performance.md), so the GPU never
takes it.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def _round_native(x, DT: tl.constexpr):
    """``x`` (fp32) rounded to DT, to nearest-even (the GPU's conversion)."""
    return x.to(DT)


@triton.jit
def _round_integer(x, DT: tl.constexpr):
    """``x`` (fp32) rounded to DT, to nearest-even, bf16 with integer operations."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        half = tl.where(x != x, 0x7FC0, bits >> 16).to(tl.uint16)
        out = half.to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DT)
    return out


# Chosen when the kernels are first imported, as Triton reads TRITON_INTERPRET then (a module
# constant rather than a constexpr global, which the interpreter does not resolve).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
round_fp32_to = _round_integer if INTERPRETED else _round_native
