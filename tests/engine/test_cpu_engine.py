"""The CPU engine's own promises, beyond the operator suite's (test_ops.py):

- the same bits whatever the thread count (1, 2 and 3 threads) and whichever chunk-loop set runs
  (the AVX2 and AVX-512 loops against the baseline ones, where the CPU has them);
- the fp16/bf16 rounding of a scaled element, over every 16-bit pattern, exactly as torch converts
  the fp64 product (through fp32);
- fp64 chunks, whose squares overflow or underflow, against the fp64 oracle at the extremes.

Sizes are picked to cross the engine's thresholds: sets above the serial limits (2^16 elements, 2^17
for the clamp) run on several threads, chunks of 2^16 elements split big tensors, and odd sizes and
misaligned views leave vector tails.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from gradients import DTYPES, random_tensors
from oracle import assert_bitwise_equal, assert_norm_close, oracle_norm

from fusedclip.backends.cpp import _lib

pytestmark = pytest.mark.skipif(not _lib.loaded(),
                                reason=f"fusedclip._C is not built ({_lib.LOAD_ERROR})")

# Big enough to be split over threads, with tails everywhere: a multi-chunk tensor, odd sizes,
# tiny ones, an empty one, and a view one element into its storage (misaligned).
SIZES = [200_003, 65_536, 1, 17, 0, 4_099, 70_001, 31]
NORM_TYPES = [2.0, 1.0, math.inf, 3.0, 0.5]  # 3 and 0.5: the general-p loop


def _tensors(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    ts = random_tensors(SIZES, dtype, seed=seed)
    ts.append(random_tensors([12_346], dtype, seed=seed + 1)[0][1:])  # misaligned
    return ts


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _capability(name: str):
    module = _lib.module()
    before = module.cpu_capability()
    module.set_cpu_capability(name)
    try:
        yield
    finally:
        module.set_cpu_capability(before)


def _run_everything(dtype: torch.dtype) -> list[torch.Tensor]:
    """Every CPU pass's outputs on one set: norms (total and per tensor) for each norm type, a
    clip, a per-tensor clip and a clamp, each on fresh copies."""
    out = []
    for p in NORM_TYPES:
        norm, coef, per = torch.ops.fusedclip.total_norm(_tensors(dtype), p, 1.0, True, None, None,
                                                         False)
        out += [norm, coef, per]
    ts = _tensors(dtype)
    out.append(torch.ops.fusedclip.clip_(ts, 0.5, 2.0, False, None, None, False)[0])
    out += ts
    ts = _tensors(dtype)
    max_norms = torch.rand(len(ts), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.append(torch.ops.fusedclip.clip_per_tensor_(ts, max_norms, 2.0, False))
    out += ts
    ts = _tensors(dtype)
    torch.ops.fusedclip.clamp_(ts, 0.75)
    return out + ts


CAPABILITIES = ["baseline", "avx2", "avx512"]


def _capability_runs(name: str) -> bool:
    if not _lib.loaded():
        return False
    module = _lib.module()
    before = module.cpu_capability()
    try:
        module.set_cpu_capability(name)
    except ValueError:
        return False
    module.set_cpu_capability(before)
    return True


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_bits_for_every_thread_count(dtype):
    with _threads(1):
        expected = _run_everything(dtype)
    for n in (2, 3):
        with _threads(n):
            assert_bitwise_equal(_run_everything(dtype), expected, nan_payloads=True)


@pytest.mark.parametrize("capability", CAPABILITIES[1:])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wider_loops_give_the_baseline_bits(dtype, capability):
    if not _capability_runs(capability):
        pytest.skip(f"this CPU or build cannot run the {capability} loops")
    with _capability("baseline"):
        expected = _run_everything(dtype)
    with _capability(capability):
        assert_bitwise_equal(_run_everything(dtype), expected, nan_payloads=True)


def test_capability_names():
    module = _lib.module()
    assert module.cpu_capability() in CAPABILITIES
    # The default is the widest set this CPU runs.
    assert module.cpu_capability() == [c for c in CAPABILITIES if _capability_runs(c)][-1]
    with pytest.raises(ValueError, match="no chunk-loop set named 'sse9'"):
        module.set_cpu_capability("sse9")


def _every_pattern(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("coef", [0.7, 1.0 + 2**-30, 3.0e4, 1e-7, float("nan")])
def test_scaled_16bit_patterns_round_as_torch(dtype, coef, capability):
    """Every fp16/bf16 bit pattern (NaNs, infinities and subnormals included) times a coefficient,
    against torch's conversion of the fp64 product through fp32, bit for bit. (A NaN matches any
    NaN: torch's own vectorized fp16 conversion keeps payloads that its scalar one drops, and the
    engine's bf16 scale keeps an input NaN's bits where c10 writes 0x7FC0.)"""
    if not _capability_runs(capability):
        pytest.skip(f"this CPU or build cannot run the {capability} loops")
    x = _every_pattern(dtype)
    expected = (x.double() * coef).float().to(dtype)
    with _capability(capability):
        got = x.clone()
        torch.ops.fusedclip.scale_([got], torch.tensor(coef, dtype=torch.float64))
    assert_bitwise_equal([got], [expected])


# Coefficients for the bf16 scale's table (AVX-512): ends of the range it serves (2^-60, 2^60) and
# just outside, ones whose 16 high bits end the expansion (a product of 24 bits or fewer), ones
# next to 1, and ones whose products often fall near a bf16 midpoint (0.37: 1.5% of elements).
BF16_COEFS = [2.0**-60, 2.0**60, 2.0**-61, 2.0**61, 0.5 + 2**-16, 1.0 - 2**-53, 1.0 + 2**-52,
              0.37, 0.1, 1.5, 2.5e-5, 7.0e4, 0.999999, 1e-30]


@pytest.mark.parametrize("capability", CAPABILITIES[1:])
def test_bf16_scale_gives_the_fp64_route_bits(capability):
    """The wide sets' bf16 scale (AVX-512: offsets looked up by mantissa) gives the baseline's
    bits (each product in fp64, rounded to fp32, then bf16) for every bf16 pattern, shuffled
    into steps of every kind (all normal, zeros, subnormals, inf and NaN beside normal ones), and
    200 more random coefficients."""
    if not _capability_runs(capability):
        pytest.skip(f"this CPU or build cannot run the {capability} loops")
    gen = torch.Generator().manual_seed(11)
    patterns = _every_pattern(torch.bfloat16)
    normal = torch.randn(70_001, generator=gen).to(torch.bfloat16)
    normal[::97] = 0.0
    x = torch.cat([patterns[torch.randperm(len(patterns), generator=gen)], patterns, normal])
    coefs = BF16_COEFS + (2.0 ** (torch.rand(200, generator=gen, dtype=torch.float64) * 130 - 65)
                          ).tolist()
    for coef in coefs:
        with _capability("baseline"):
            expected = x.clone()
            torch.ops.fusedclip.scale_([expected], torch.tensor(coef, dtype=torch.float64))
        with _capability(capability):
            got = x.clone()
            torch.ops.fusedclip.scale_([got], torch.tensor(coef, dtype=torch.float64))
        assert_bitwise_equal([got], [expected], nan_payloads=True)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bound", [0.0, 1e-6, 0.5, 6e4])
def test_clamped_16bit_patterns_as_torch(dtype, bound, capability):
    """Every 16-bit pattern clamped as torch's CPU clamp_min_/clamp_max_ does, signs of zero
    included. (NaNs stay NaN; their bits are kept here, where torch's fp16 round trip through fp32
    quiets signaling ones.)"""
    if not _capability_runs(capability):
        pytest.skip(f"this CPU or build cannot run the {capability} loops")
    x = _every_pattern(dtype)
    expected = x.clone().clamp_min_(-bound).clamp_max_(bound)
    with _capability(capability):
        got = x.clone()
        torch.ops.fusedclip.clamp_([got], bound)
    assert_bitwise_equal([got], [expected])


def _special_float_patterns(dtype: torch.dtype) -> torch.Tensor:
    """fp32/fp64 values a clamp can get wrong, each sign: zero, the smallest and largest
    subnormals, the smallest normal, values next to the bounds below, the largest finite value,
    inf and NaNs with payloads (quiet and signaling); shuffled into 4,099 elements (vector tails)
    with normal values between them."""
    bits_dtype, width = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}[dtype]
    info = torch.finfo(dtype)
    values = torch.tensor([0.0, info.smallest_normal, 0.5, 1.0, 3.0e38, info.max, math.inf],
                          dtype=dtype)
    near = torch.cat([torch.nextafter(values, values.new_full((1,), math.inf)),
                      torch.nextafter(values, values.new_zeros(1))])
    mantissa = 23 if width == 32 else 52
    exponent = (1 << (width - 1 - mantissa)) - 1
    raw = torch.tensor([1, (1 << mantissa) - 1, (exponent << mantissa) | 1,
                        (exponent << mantissa) | (1 << (mantissa - 1)) | 5], dtype=torch.int64)
    special = torch.cat([values, near, raw.to(bits_dtype).view(dtype)])
    special = torch.cat([special, -special])
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4099, generator=gen, dtype=torch.float64).to(dtype)
    x[torch.randperm(4099, generator=gen)[:len(special)]] = special
    return x


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bound", [0.0, 1e-40, 0.5, 1.0, 3.0e38, math.inf])
def test_clamped_float_patterns_as_torch(dtype, bound, capability):
    """fp32/fp64 clamped as torch's CPU clamp_min_/clamp_max_ do, bit for bit (signs of zero, the
    bound's own bits, subnormals, NaN payloads), in the vectors and their tails alike."""
    if not _capability_runs(capability):
        pytest.skip(f"this CPU or build cannot run the {capability} loops")
    x = _special_float_patterns(dtype)
    expected = x.clone().clamp_min_(-bound).clamp_max_(bound)
    with _capability(capability):
        got = [x.clone(), x.clone()[1:]]  # and one element into its storage (misaligned)
        torch.ops.fusedclip.clamp_(got, bound)
    assert_bitwise_equal(got, [expected, expected[1:]], nan_payloads=True)


FP64_EXTREMES = {
    "huge": [1e300, -3e302, 1e303],  # squares overflow; the norm does not
    "tiny": [1e-300, -3e-310, 5e-324],
    "mixed": [1e300, 1e-300, 5e-324, -1.0],
    "subnormal_only": [5e-324, -1e-315, 2e-310],
}


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("case", list(FP64_EXTREMES))
def test_fp64_extremes_match_the_oracle(case, p):
    """fp64 chunks are summed scaled by a power of two near their largest element (or exactly,
    element by element, when that is tiny): no overflow to inf, no underflow to 0."""
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor(FP64_EXTREMES[case], dtype=torch.float64)
    ts = [values[torch.randint(len(values), (n,), generator=gen)]
          * torch.rand(n, dtype=torch.float64, generator=gen) for n in (70_001, 33, 1)]
    norm, _, per = torch.ops.fusedclip.total_norm(ts, p, 1.0, True, None, None, False)
    expected = oracle_norm(ts, p)
    # Finite wherever the true norm is (p = 0.5 of 70,001 values near 1e303 is not).
    assert expected > 0 and (math.isfinite(expected) or (case, p) == ("huge", 0.5))
    assert_norm_close(norm, expected)
    for t, n in zip(ts, per):
        assert_norm_close(n, oracle_norm([t], p))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_elements_on_every_thread(dtype):
    """An inf or NaN anywhere (here in the last chunk a thread takes) decides the norm."""
    for bad, expected in ((math.inf, math.inf), (math.nan, math.nan)):
        ts = _tensors(dtype)
        ts[0][-1] = bad
        with _threads(2):
            for p in NORM_TYPES:
                norm = torch.ops.fusedclip.total_norm(ts, p, 1.0, False, None, None, False)[0]
                assert_norm_close(norm, expected)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_one_call_path_returns_an_fp64_norm_in_full(p):
    """An fp64 model's norm comes back from the one-call path (``_C.clip_params``) as the fp64
    norm, not rounded through fp32 on the way."""
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in _tensors(torch.float64)]
    for param, t in zip(params, _tensors(torch.float64)):
        param.grad = t
    expected = oracle_norm([q.grad for q in params], p)
    out, coef, norm = _lib.module().clip_params(params, 1e300, p, False)
    assert out.dtype == torch.float64
    assert_norm_close(out, expected)
    assert_norm_close(norm, expected)
    assert float(coef) == 1.0


@pytest.mark.parametrize("p", [0.01, 0.02, 0.5])
def test_small_p_keeps_tiny_elements(p):
    """For a small p, elements 1e-400 times the largest still count ((1e-400)^0.01 is 1e-4): the
    general-p loop works on log2 |x| - log2 max, never on the underflowing ratio."""
    ts = [torch.tensor([1e100] + [1e-300] * 50, dtype=torch.float64)]
    norm = torch.ops.fusedclip.total_norm(ts, p, 1.0, False, None, None, False)[0]
    assert_norm_close(norm, oracle_norm(ts, p))


def test_huge_p_norm_is_the_maximum():
    """p = 1e20: every term but the largest's is 0, and the largest's is exactly 1 (its log2 is
    subtracted from itself), so the norm is the maximum, not 0."""
    ts = [torch.tensor([1.00566, 0.5], dtype=torch.float32)]
    norm = torch.ops.fusedclip.total_norm(ts, 1e20, 1.0, False, None, None, False)[0]
    assert float(norm) == float(ts[0][0])


@contextlib.contextmanager
def _flush_denormal():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_fp64_near_the_top_under_flush_to_zero(p):
    """torch.set_flush_denormal(True) (DAZ/FTZ) must not zero the scale factors of fp64 chunks
    whose maximum is at or above 2^1023."""
    ts = [torch.tensor([1e308, 3.0], dtype=torch.float64)]
    expected = oracle_norm(ts, p)
    with _flush_denormal():
        norm = torch.ops.fusedclip.total_norm(ts, p, 1.0, False, None, None, False)[0]
    assert_norm_close(norm, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_zero_clip_value_as_torch(dtype):
    """clip_value = -0.0 passes the >= 0 check; torch then clamps to [+0.0, -0.0] (clamp_min_,
    then clamp_max_): the engine gives the same signs."""
    x = torch.tensor([3.0, -3.0, 0.0, -0.0, float("nan"), 1e-3, -1e-3], dtype=dtype)
    expected = x.clone().clamp_min_(0.0).clamp_max_(-0.0)
    got = x.clone()
    torch.ops.fusedclip.clamp_([got], -0.0)
    assert_bitwise_equal([got], [expected])


@pytest.mark.parametrize("capability", CAPABILITIES[1:])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_norms_are_the_same_bits_on_every_set(dtype, capability):
    """A NaN norm is the canonical NaN on every instruction set (a vector add keeps one operand's
    payload, and which one depends on the vector width)."""
    if not _capability_runs(capability):
        pytest.skip(f"this CPU or build cannot run the {capability} loops")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4099, generator=gen, dtype=torch.float64)
    x[torch.randint(4099, (40,), generator=gen)] = float("nan")
    x[::7] = -x[::7]
    ts = [x.to(dtype)]
    for p in NORM_TYPES:
        with _capability("baseline"):
            expected = torch.ops.fusedclip.total_norm(ts, p, 1.0, True, None, None, False)
        with _capability(capability):
            got = torch.ops.fusedclip.total_norm(ts, p, 1.0, True, None, None, False)
        assert_bitwise_equal(list(got), list(expected), nan_payloads=True)
