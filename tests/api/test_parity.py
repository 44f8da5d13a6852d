"""The public API against torch.nn.utils and the fp64 oracle, for every backend on every device
(the ``backend`` x ``device`` matrix of conftest).

Every clipped gradient must be within one rounding of its dtype of the fp64 oracle; the returned
norm must have torch's device and shape, the gradients' dtypes promoted with float32 (torch's
dtype promoted with float32), and match the oracle's norm to the 1e-5 contract whatever the
gradients' dtype.
"""

from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch
from gradients import DTYPES, NORM_TYPES, SHAPE_CLASSES, clone_params, grads, make_params
from oracle import (
    assert_bitwise_equal,
    assert_norm_close,
    clip_rtol,
    oracle_clipped,
    oracle_coef,
    oracle_norm,
    oracle_norm_dtype,
    rtol_for,
    torch_or_skip,
    ulp_close,
)

import fusedclip
from fusedclip import _versions


def check_clip_against_oracle_and_torch(params, max_norm_factor, norm_type, backend):
    """Clip ``params`` with fusedclip and a copy with torch; check both against the oracle."""
    before = [g.clone() for g in grads(params)]
    exact = oracle_norm(before, norm_type)
    max_norm = max_norm_factor * exact
    theirs = clone_params(params)
    try:
        torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    except RuntimeError as e:
        # torch cannot take the max norm of a list holding an empty tensor; fusedclip takes the max
        # over all elements there are (a deliberate difference).
        assert "empty tensor" in str(e) and math.isinf(norm_type)
        torch_norm = None

    ours = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend)

    assert ours.shape == () and ours.device == before[0].device
    assert ours.dtype == oracle_norm_dtype(before)
    assert_norm_close(ours, exact)  # 1e-5, the contract, whatever the gradients' dtype
    for g, g0 in zip(grads(params), before):
        ulp_close(g, oracle_clipped(g0, max_norm, exact))
    # Where torch's norm overflowed its dtype (fp16 above 65504) torch scaled by 0, which fusedclip
    # deliberately does not do: the oracle check above covers that case.
    if torch_norm is not None and torch.isfinite(torch_norm):
        assert ours.dtype == torch.promote_types(torch_norm.dtype, torch.float32)
        # torch's coefficient carries its norm's error and a rounding to the norm's dtype; its
        # product another rounding. Allow that much (twice over) between torch and fusedclip.
        torch_err = abs(float(torch_norm) - exact) / exact if exact else 0.0
        for g, t in zip(grads(params), grads(theirs)):
            fi = torch.finfo(g.dtype)
            torch_rtol = 2 * (torch_err + torch.finfo(torch_norm.dtype).eps + 2 * fi.eps)
            rtol = clip_rtol(g.dtype) + torch_rtol
            torch.testing.assert_close(g, t, rtol=rtol, atol=fi.tiny)
    return ours


@pytest.mark.parametrize("shape_class", sorted(SHAPE_CLASSES))
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_matches_oracle_and_torch(backend, device, dtype, norm_type, shape_class):
    if (backend, device, shape_class) == ("triton", "cpu", "many"):
        # 2,000 programs per launch take ~20 s each in Triton's interpreter; the operator suite
        # runs hundreds of tensors once instead.
        pytest.skip("too slow in Triton's CPU interpreter")
    params = make_params(SHAPE_CLASSES[shape_class], dtype, device,
                         seed=zlib.crc32(shape_class.encode()))
    check_clip_against_oracle_and_torch(params, 0.25, norm_type, backend)


@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_and_misaligned_grads(backend, device, dtype, layout):
    params = make_params([(33, 7), (5, 4, 3), (129, 2), (1, 9)], dtype, device, seed=3,
                         layout=layout)
    g0 = params[0].grad
    assert layout != "transposed" or not g0.is_contiguous()
    assert layout != "strided" or g0.stride(-1) == 2
    assert layout != "offset" or g0.storage_offset() == 1
    check_clip_against_oracle_and_torch(params, 0.1, 2.0, backend)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
def test_mixed_dtypes(backend, device, norm_type):
    params = []
    for i, dtype in enumerate([torch.float16, torch.float32, torch.bfloat16, torch.float64] * 3):
        params += make_params([(17 + i, 3)], dtype, device, seed=i)
    ours = check_clip_against_oracle_and_torch(params, 0.3, norm_type, backend)
    assert ours.dtype == torch.float64


def test_half_and_bfloat16_promote_to_float32(backend, device):
    params = (make_params([(10,)], torch.float16, device, seed=1)
              + make_params([(9,)], torch.bfloat16, device))
    assert check_clip_against_oracle_and_torch(params, 0.5, 2.0, backend).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_grads_on_two_devices(backend):
    """CPU and CUDA gradients in one call: each device reduced by itself, the norms combined, every
    gradient scaled on its own device."""
    params = (make_params([(300, 7), (5,)], torch.float32, "cpu", seed=15)
              + make_params([(70001,), (3, 3)], torch.bfloat16, "cuda", seed=16))
    check_clip_against_oracle_and_torch(params, 0.25, 2.0, backend)
    assert [p.grad.device.type for p in params] == ["cpu", "cpu", "cuda", "cuda"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grads_unchanged_when_norm_is_under_max_norm(backend, device, dtype):
    params = make_params(SHAPE_CLASSES["several"], dtype, device, seed=5)
    before = [g.clone() for g in grads(params)]
    norm = fusedclip.clip_grad_norm_(params, 1e6, backend=backend)
    assert torch.isfinite(norm) and norm > 0
    assert_bitwise_equal(grads(params), before)


def test_none_grads_are_skipped(backend, device):
    params = make_params([(4, 4)] * 9, torch.float32, device, seed=2, none_every=3)
    assert sum(p.grad is None for p in params) == 3
    check_clip_against_oracle_and_torch(params, 0.5, 2.0, backend)
    assert sum(p.grad is None for p in params) == 3


def test_single_tensor_argument(backend, device):
    (p,) = make_params([(6, 5)], device=device, seed=4)
    (q,) = clone_params([p])
    ours = fusedclip.clip_grad_norm_(p, 0.5, backend=backend)
    theirs = torch.nn.utils.clip_grad_norm_(q, 0.5)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(p.grad, q.grad)


# No backend runs without gradients, and foreach is dropped before one is chosen: these tests take
# no backend.

def test_no_grads_returns_cpu_zero_like_torch():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for args in ([], params):
            ours = fusedclip.clip_grad_norm_(args, 1.0)
            theirs = torch.nn.utils.clip_grad_norm_(args, 1.0)
            assert torch.equal(ours, theirs) and ours.device == theirs.device
            assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(fusedclip.get_total_norm([]), torch.nn.utils.get_total_norm([]))


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator") as record:
        norm = fusedclip.clip_grad_norm_((p for p in []), 1.0)
    assert record[0].filename == __file__, "the warning should point at the caller"
    assert torch.equal(norm, torch.tensor(0.0))
    # torch warns too from 2.8; 2.6 and 2.7 do not (docs/differences.md, per torch version)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    torch_warns = any("empty generator" in str(w.message) for w in seen)
    assert torch_warns == (_versions.release(torch.__version__) >= (2, 8))


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_is_accepted_and_changes_nothing(foreach):
    params = make_params(SHAPE_CLASSES["several"], seed=10)
    twin = clone_params(params)
    a = fusedclip.clip_grad_norm_(params, 0.5, foreach=foreach)
    b = fusedclip.clip_grad_norm_(twin, 0.5)
    assert torch.equal(a, b)
    assert_bitwise_equal(grads(params), grads(twin))


def test_generator_of_parameters(backend, device):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model.to(device)
    model(torch.randn(5, 8, device=device)).square().sum().backward()
    twin = clone_params(list(model.parameters()))
    ours = fusedclip.clip_grad_norm_(model.parameters(), 0.1, backend=backend)
    theirs = torch.nn.utils.clip_grad_norm_(iter(twin), 0.1)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_get_total_norm(backend, device, norm_type):
    tensors = grads(make_params(SHAPE_CLASSES["several"], torch.float32, device, seed=7))
    before = [t.clone() for t in tensors]
    ours = fusedclip.get_total_norm(tensors, norm_type, backend=backend)
    theirs = torch.nn.utils.get_total_norm(tensors, norm_type)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours.double(), torch.tensor(oracle_norm(tensors, norm_type),
                                                           dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    assert_bitwise_equal(tensors, before)
    single = fusedclip.get_total_norm(tensors[0], norm_type, backend=backend)
    torch.testing.assert_close(single, torch.nn.utils.get_total_norm(tensors[0], norm_type),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grads_with_norm(backend, device, dtype):
    params = make_params(SHAPE_CLASSES["several"], dtype, device, seed=8)
    twin = clone_params(params)
    before = [g.clone() for g in grads(params)]
    norm = torch.nn.utils.get_total_norm(before)
    fusedclip.clip_grads_with_norm_(params, 0.5, norm, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(twin, 0.5, norm)
    for g, g0, t in zip(grads(params), before, grads(twin)):
        ulp_close(g, oracle_clipped(g0, 0.5, float(norm)))
        fi = torch.finfo(dtype)
        torch.testing.assert_close(g, t, rtol=2 * fi.eps, atol=fi.tiny)
    # A plain number works too, and a norm under max_norm changes nothing.
    after = [g.clone() for g in grads(params)]
    fusedclip.clip_grads_with_norm_(params, 10.0, 1.0, backend=backend)
    assert_bitwise_equal(grads(params), after)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grad_value_bitwise_equal_to_torch(backend, device, dtype):
    params = make_params(SHAPE_CLASSES["several"] + [(9, 9)], dtype, device, seed=9,
                         layout="strided")
    params[0].grad[0, 0] = math.nan
    twin = clone_params(params)
    fusedclip.clip_grad_value_(params, 0.7, backend=backend)
    torch.nn.utils.clip_grad_value_(twin, 0.7)
    assert_bitwise_equal(grads(params), grads(twin))
    limit = float(torch.tensor(0.7, dtype=dtype))  # 0.7 as the dtype holds it
    assert all(float(g.nan_to_num().abs().max()) <= limit for g in grads(params))


@pytest.mark.parametrize("clip_value, clamped",
                         [(1e5, (torch.float32, torch.bfloat16, torch.float64)),
                          (1e39, (torch.float64,))])
def test_clip_value_past_a_dtypes_range_clamps_nothing_of_it(backend, device, clip_value,
                                                             clamped):
    """1e5 is past fp16's range (1e39 past fp32's and bf16's too): torch raises, after clamping
    the gradients before the first such one. Every backend clamps the gradients whose dtype holds
    the bound, and leaves the others as they are (their bound is inf)."""
    values = [3e5, -7e38, 12.0, -0.5, math.nan]
    params = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        held = [v for v in values if math.isnan(v) or abs(v) <= torch.finfo(dtype).max]
        p = torch.nn.Parameter(torch.zeros(len(held), dtype=dtype, device=device))
        p.grad = torch.tensor(held, dtype=dtype, device=device)
        params.append(p)
    before = [g.clone() for g in grads(params)]
    with pytest.raises(RuntimeError, match="without overflow"):
        torch.nn.utils.clip_grad_value_(clone_params(params), clip_value)
    fusedclip.clip_grad_value_(params, clip_value, backend=backend)
    for g, g0 in zip(grads(params), before):
        expected = g0.clamp(-clip_value, clip_value) if g0.dtype in clamped else g0
        assert_bitwise_equal([g], [expected])
    assert float(grads(params)[0][0]) == (1e5 if clip_value == 1e5 else 3e5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(backend, device, dtype):
    results = []
    for _ in range(3):
        params = make_params(SHAPE_CLASSES["odd_sizes"], dtype, device, seed=11)
        norm = fusedclip.clip_grad_norm_(params, 0.2, backend=backend)
        results.append([norm, *grads(params)])
    assert_bitwise_equal(results[1], results[0])
    assert_bitwise_equal(results[2], results[0])


# ---- the norm types the passes do not take: 0, negative p, -inf ---------------------------------
# (NaN is refused: tests/api/test_bad_input.py)

GENERAL_NORM_TYPES = [0.0, -1.0, -2.0, -0.5, -math.inf]


def torch_norm_fp64(tensors, norm_type):
    """torch's own definition of these norms (the norm of the per-tensor norms), in fp64: the
    oracle for them."""
    return float(torch.nn.utils.get_total_norm([t.detach().double().cpu() for t in tensors],
                                               norm_type))


@pytest.mark.parametrize("norm_type", GENERAL_NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_norm_type_torch_takes(backend, device, dtype, norm_type):
    params = make_params([(33, 7), (5,), (129, 2), (1, 9)], dtype, device, seed=30)
    params[1].grad[2] = 0.0  # a zero: the negative-p norm of its tensor is 0, and so the total
    twin = clone_params(params)
    before = [g.clone() for g in grads(params)]
    exact = torch_norm_fp64(before, norm_type)
    max_norm = 0.5 * exact if exact > 0 else 0.5
    ours = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend)
    theirs = torch.nn.utils.clip_grad_norm_(twin, max_norm, norm_type)
    assert ours.dtype == oracle_norm_dtype(before) and ours.device == before[0].device
    assert_norm_close(ours, exact)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=rtol_for(theirs.dtype), atol=0,
                               equal_nan=True)
    for g, g0 in zip(grads(params), before):
        ulp_close(g, oracle_clipped(g0, max_norm, exact))
    total = fusedclip.get_total_norm(before, norm_type, backend=backend)
    assert total.dtype == ours.dtype
    torch.testing.assert_close(total, ours, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("norm_type", [-1.0, -math.inf, 0.0])
def test_general_norm_types_with_the_other_options(backend, device, norm_type):
    """return_stats (per-tensor norms too), soft mode and error_if_nonfinite on the general path."""
    params = make_params([(33, 7), (5,), (129, 2)], torch.bfloat16, device, seed=31)
    before = [g.clone() for g in grads(params)]
    exact = torch_norm_fp64(before, norm_type)
    stats = fusedclip.clip_grad_norm_(params, 0.5 * exact, norm_type, backend=backend,
                                      return_stats="per_tensor", mode="soft")
    assert_norm_close(stats.total_norm, exact)
    torch.testing.assert_close(float(stats.clip_coef), oracle_coef(0.5 * exact, exact, True),
                               rtol=1e-12, atol=0)
    for n, g0 in zip(stats.per_tensor_norms.tolist(), before):
        assert_norm_close(n, torch_norm_fp64([g0], norm_type))
    for g, g0 in zip(grads(params), before):
        ulp_close(g, oracle_clipped(g0, 0.5 * exact, exact, soft=True))
    params[0].grad[0, 0] = math.nan
    untouched = [g.clone() for g in grads(params)]
    if norm_type == 0:  # a NaN is an element that is not 0: the count stays finite, as in torch
        norm = fusedclip.clip_grad_norm_(params, 1e9, norm_type, error_if_nonfinite=True,
                                         backend=backend)
        assert float(norm) == torch_norm_fp64(untouched, norm_type) == 3.0
        return
    with pytest.raises(RuntimeError, match=f"norm of order {norm_type} .* is non-finite"):
        fusedclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True,
                                  backend=backend)
    assert_bitwise_equal(grads(params), untouched)


def test_negative_norm_of_huge_gradients_as_torch(backend, device):
    """torch's own test: the -1 norm of 20 gradients of 2e22 is 2e22 / 20."""
    params = make_params([(10,), (10,)], torch.float32, device, seed=32)
    for p in params:
        p.grad.fill_(2e22)
    norm = fusedclip.clip_grad_norm_(params, 1.0, norm_type=-1, backend=backend)
    assert norm.dtype == torch.float32
    assert_norm_close(norm, 1e21)
    ulp_close(params[0].grad, torch.full((10,), 2e22 / (1e21 + 1e-6)))


def test_fp64_norm_past_fp64_range_unlike_torch(backend, device):
    """A deliberate difference: torch sums squares of fp64 gradients of 2e200 into inf, so its
    norm is inf and its clip zeroes the gradients (or raises with error_if_nonfinite); fusedclip's
    norm is finite and it clips them (README "Different from torch")."""
    params = make_params([(1000,), (77,)], torch.float64, device, seed=33)
    for p in params:
        p.grad.mul_(2e200)
    twin = clone_params(params)
    before = [g.clone() for g in grads(params)]
    exact = oracle_norm(before, 2.0)
    assert math.isinf(float(torch.nn.utils.clip_grad_norm_(twin, 1.0)))
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, error_if_nonfinite=True)
    norm = fusedclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, backend=backend)
    assert math.isfinite(float(norm))
    assert_norm_close(norm, exact)
    for g, g0 in zip(grads(params), before):
        ulp_close(g, oracle_clipped(g0, 1.0, exact))


# ---- non-finite gradients --------------------------------------------------------------------

# -inf stands for inf too: magnitudes are taken before anything else.
@pytest.mark.parametrize("bad", [-math.inf, math.nan], ids=["-inf", "nan"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_matches_torch(backend, device, dtype, norm_type, bad):
    params = make_params(SHAPE_CLASSES["several"], dtype, device, seed=12)
    params[2].grad.view(-1)[41] = bad
    twin = clone_params(params)
    before = [g.clone() for g in grads(params)]
    ours = fusedclip.clip_grad_norm_(params, 1.0, norm_type, backend=backend)
    theirs = torch.nn.utils.clip_grad_norm_(twin, 1.0, norm_type)
    expected = math.nan if math.isnan(bad) else math.inf
    assert ours.dtype == torch.promote_types(theirs.dtype, torch.float32)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), equal_nan=True)
    torch.testing.assert_close(ours.double(), torch.tensor(expected, dtype=torch.float64),
                               equal_nan=True)
    for g, g0, t in zip(grads(params), before, grads(twin)):
        expected_g = oracle_clipped(g0, 1.0, expected)
        torch.testing.assert_close(g, expected_g, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(g, t, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_error_if_nonfinite_raises_and_leaves_grads(backend, device, norm_type, bad):
    params = make_params(SHAPE_CLASSES["several"], torch.bfloat16, device, seed=13)
    params[1].grad[5] = bad
    before = [g.clone() for g in grads(params)]
    with pytest.raises(RuntimeError, match="non-finite") as ours:
        fusedclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True,
                                  backend=backend)
    assert_bitwise_equal(grads(params), before)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, norm_type,
                                       error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.get_total_norm(before, norm_type, error_if_nonfinite=True, backend=backend)


def test_error_if_nonfinite_tests_the_returned_norm_unlike_torch(backend, device):
    # The fp16 norm of these gradients (60000 * 64) overflows fp16: torch's is inf, so it raises.
    # fusedclip's returned norm is fp32, finite: it clips them, as without error_if_nonfinite (a
    # deliberate difference, README "Different from torch").
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float16, device=device))
    p.grad = torch.full((4096,), 60000.0, dtype=torch.float16, device=device)
    (q,) = clone_params([p])
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_([q], 1.0, error_if_nonfinite=True)
    before = p.grad.clone()
    norm = fusedclip.clip_grad_norm_([p], 1.0, error_if_nonfinite=True, backend=backend)
    assert norm.dtype == torch.float32
    assert_norm_close(norm, 60000.0 * 64)
    ulp_close(p.grad, oracle_clipped(before, 1.0, 60000.0 * 64))


def test_error_if_nonfinite_with_finite_grads_clips(backend, device):
    params = make_params(SHAPE_CLASSES["several"], device=device, seed=14)
    check = clone_params(params)
    a = fusedclip.clip_grad_norm_(params, 0.5, error_if_nonfinite=True, backend=backend)
    b = fusedclip.clip_grad_norm_(check, 0.5, backend=backend)
    assert torch.equal(a, b)
    assert_bitwise_equal(grads(params), grads(check))


# ---- reference-only gradient kinds ------------------------------------------------------------

def test_sparse_grads_on_reference_match_torch():
    emb, twin = torch.nn.Embedding(50, 4, sparse=True), torch.nn.Embedding(50, 4, sparse=True)
    twin.load_state_dict(emb.state_dict())
    idx = torch.tensor([3, 7, 7, 49, 0, 3])
    for m in (emb, twin):
        m(idx).pow(3).sum().backward()
    assert emb.weight.grad.is_sparse
    theirs = torch_or_skip(torch.nn.utils.clip_grad_norm_, twin.parameters(), 0.3)
    ours = fusedclip.clip_grad_norm_(emb.parameters(), 0.3, backend="reference")
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(emb.weight.grad.to_dense(), twin.weight.grad.to_dense())


def test_complex_grads_on_reference_match_torch():
    p = torch.nn.Parameter(torch.randn(10, 3, dtype=torch.complex64))
    p.grad = torch.randn(10, 3, dtype=torch.complex64)
    (q,) = clone_params([p])
    ours = fusedclip.clip_grad_norm_([p], 0.5, backend="reference")
    theirs = torch.nn.utils.clip_grad_norm_([q], 0.5)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(p.grad, q.grad)
