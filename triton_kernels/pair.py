"""The partial (m, s) that pass 1 writes and the finish combines (csrc/engine/norm_math.h): m =
max |x|, s = sum (|x| / m)^p; the norm kinds and the NaN-aware max helpers both sides share. No
kernels here.
"""

from __future__ import annotations

import triton
import triton.language as tl

KIND_ONE, KIND_TWO, KIND_INF, KIND_GENERAL = 0, 1, 2, 3


def norm_kind(p: float) -> int:
    if p == 1.0:
        return KIND_ONE
    if p == 2.0:
        return KIND_TWO
    if p == float("inf"):
        return KIND_INF
    return KIND_GENERAL


@triton.jit
def ratio_pow(b, a, p, KIND: tl.constexpr):
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
def nan_max(a):
    """max over a 1-D fp64 block, NaN if any element is NaN (tl.max may drop NaNs)."""
    has_nan = tl.max((a != a).to(tl.int32), axis=0)
    m = tl.max(tl.where(a != a, 0.0, a), axis=0)
    return tl.where(has_nan > 0, float("nan"), m)


@triton.jit
def nan_maximum(a, b):
    """max(a, b), NaN if either is (tl.maximum leaves NaN handling to the hardware)."""
    return tl.where((a != a) | (b != b), float("nan"), tl.maximum(a, b))
