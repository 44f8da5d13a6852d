"""fusedclip against torch.nn.utils and the fp64 oracle, on the CPU, for every runnable backend.

Every clipped gradient must be within one rounding of its dtype of the fp64 oracle; the returned
norm must have torch's dtype, device and shape and be the oracle's norm rounded to that dtype.
"""

from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch
from conftest import (
    DTYPES,
    NORM_TYPES,
    SHAPE_CLASSES,
    assert_bitwise_equal,
    clip_rtol,
    clone_params,
    grads,
    make_params,
    oracle_clipped,
    oracle_norm,
    rtol_for,
    ulp_close,
)

import fusedclip
from fusedclip.inputs import norm_result_dtype


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
    expected = torch.tensor(exact, dtype=torch.float64).to(norm_result_dtype(before))
    assert ours.dtype == expected.dtype
    torch.testing.assert_close(ours.double(), expected.double(), rtol=rtol_for(ours.dtype), atol=0)
    for g, g0 in zip(grads(params), before):
        ulp_close(g, oracle_clipped(g0, max_norm, exact))
    # Where torch's norm overflowed its dtype (fp16 above 65504) torch scaled by 0, which fusedclip
    # deliberately does not do: the oracle check above covers that case.
    if torch_norm is not None and torch.isfinite(torch_norm):
        assert ours.dtype == torch_norm.dtype
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
def test_clip_matches_oracle_and_torch(cpu_backend, dtype, norm_type, shape_class):
    if cpu_backend == "triton" and shape_class == "many":
        # 2,000 programs per launch take ~20 s each in Triton's interpreter; test_triton.py runs
        # hundreds of tensors once instead.
        pytest.skip("too slow in Triton's CPU interpreter")
    params = make_params(SHAPE_CLASSES[shape_class], dtype, seed=zlib.crc32(shape_class.encode()))
    check_clip_against_oracle_and_torch(params, 0.25, norm_type, cpu_backend)


@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_and_misaligned_grads(cpu_backend, dtype, layout):
    params = make_params([(33, 7), (5, 4, 3), (129, 2), (1, 9)], dtype, seed=3, layout=layout)
    g0 = params[0].grad
    assert layout != "transposed" or not g0.is_contiguous()
    assert layout != "strided" or g0.stride(-1) == 2
    assert layout != "offset" or g0.storage_offset() == 1
    check_clip_against_oracle_and_torch(params, 0.1, 2.0, cpu_backend)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
def test_mixed_dtypes(cpu_backend, norm_type):
    params = []
    for i, dtype in enumerate([torch.float16, torch.float32, torch.bfloat16, torch.float64] * 3):
        params += make_params([(17 + i, 3)], dtype, seed=i)
    ours = check_clip_against_oracle_and_torch(params, 0.3, norm_type, cpu_backend)
    assert ours.dtype == torch.float64


def test_half_and_bfloat16_promote_to_float32(cpu_backend):
    params = make_params([(10,)], torch.float16, seed=1) + make_params([(9,)], torch.bfloat16)
    assert check_clip_against_oracle_and_torch(params, 0.5, 2.0, cpu_backend).dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grads_unchanged_when_norm_is_under_max_norm(cpu_backend, dtype):
    params = make_params(SHAPE_CLASSES["several"], dtype, seed=5)
    before = [g.clone() for g in grads(params)]
    norm = fusedclip.clip_grad_norm_(params, 1e6, backend=cpu_backend)
    assert torch.isfinite(norm) and norm > 0
    assert_bitwise_equal(grads(params), before)


def test_none_grads_are_skipped(cpu_backend):
    params = make_params([(4, 4)] * 9, torch.float32, seed=2, none_every=3)
    assert sum(p.grad is None for p in params) == 3
    check_clip_against_oracle_and_torch(params, 0.5, 2.0, cpu_backend)
    assert sum(p.grad is None for p in params) == 3


def test_single_tensor_argument(cpu_backend):
    (p,) = make_params([(6, 5)], seed=4)
    (q,) = clone_params([p])
    ours = fusedclip.clip_grad_norm_(p, 0.5, backend=cpu_backend)
    theirs = torch.nn.utils.clip_grad_norm_(q, 0.5)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(p.grad, q.grad)


def test_no_grads_returns_cpu_zero_like_torch(cpu_backend):
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for args in ([], params):
            ours = fusedclip.clip_grad_norm_(args, 1.0, backend=cpu_backend)
            theirs = torch.nn.utils.clip_grad_norm_(args, 1.0)
            assert torch.equal(ours, theirs) and ours.device == theirs.device
            assert ours.dtype == theirs.dtype == torch.float32
        assert torch.equal(fusedclip.get_total_norm([]), torch.nn.utils.get_total_norm([]))


def test_empty_generator_warns_like_torch(cpu_backend):
    with pytest.warns(UserWarning, match="empty generator") as record:
        norm = fusedclip.clip_grad_norm_((p for p in []), 1.0, backend=cpu_backend)
    assert record[0].filename == __file__, "the warning should point at the caller"
    assert torch.equal(norm, torch.tensor(0.0))
    with pytest.warns(UserWarning, match="empty generator"):
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)


def test_generator_of_parameters(cpu_backend):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model(torch.randn(5, 8)).square().sum().backward()
    twin = clone_params(list(model.parameters()))
    ours = fusedclip.clip_grad_norm_(model.parameters(), 0.1, backend=cpu_backend)
    theirs = torch.nn.utils.clip_grad_norm_(iter(twin), 0.1)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_get_total_norm(cpu_backend, norm_type):
    tensors = grads(make_params(SHAPE_CLASSES["several"], torch.float32, seed=7))
    before = [t.clone() for t in tensors]
    ours = fusedclip.get_total_norm(tensors, norm_type, backend=cpu_backend)
    theirs = torch.nn.utils.get_total_norm(tensors, norm_type)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours.double(), torch.tensor(oracle_norm(tensors, norm_type),
                                                           dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    assert_bitwise_equal(tensors, before)
    single = fusedclip.get_total_norm(tensors[0], norm_type, backend=cpu_backend)
    torch.testing.assert_close(single, torch.nn.utils.get_total_norm(tensors[0], norm_type),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grads_with_norm(cpu_backend, dtype):
    params = make_params(SHAPE_CLASSES["several"], dtype, seed=8)
    twin = clone_params(params)
    before = [g.clone() for g in grads(params)]
    norm = torch.nn.utils.get_total_norm(before)
    fusedclip.clip_grads_with_norm_(params, 0.5, norm, backend=cpu_backend)
    torch.nn.utils.clip_grads_with_norm_(twin, 0.5, norm)
    for g, g0, t in zip(grads(params), before, grads(twin)):
        ulp_close(g, oracle_clipped(g0, 0.5, float(norm)))
        fi = torch.finfo(dtype)
        torch.testing.assert_close(g, t, rtol=2 * fi.eps, atol=fi.tiny)
    # A plain number works too, and a norm under max_norm changes nothing.
    after = [g.clone() for g in grads(params)]
    fusedclip.clip_grads_with_norm_(params, 10.0, 1.0, backend=cpu_backend)
    assert_bitwise_equal(grads(params), after)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grad_value_bitwise_equal_to_torch(cpu_backend, dtype):
    params = make_params(SHAPE_CLASSES["several"] + [(9, 9)], dtype, seed=9, layout="strided")
    params[0].grad[0, 0] = math.nan
    twin = clone_params(params)
    fusedclip.clip_grad_value_(params, 0.7, backend=cpu_backend)
    torch.nn.utils.clip_grad_value_(twin, 0.7)
    assert_bitwise_equal(grads(params), grads(twin))
    limit = float(torch.tensor(0.7, dtype=dtype))  # 0.7 as the dtype holds it
    assert all(float(g.nan_to_num().abs().max()) <= limit for g in grads(params))


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_is_accepted_and_changes_nothing(cpu_backend, foreach):
    params = make_params(SHAPE_CLASSES["several"], seed=10)
    twin = clone_params(params)
    a = fusedclip.clip_grad_norm_(params, 0.5, foreach=foreach, backend=cpu_backend)
    b = fusedclip.clip_grad_norm_(twin, 0.5, backend=cpu_backend)
    assert torch.equal(a, b)
    assert_bitwise_equal(grads(params), grads(twin))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_deterministic(cpu_backend, dtype):
    results = []
    for _ in range(3):
        params = make_params(SHAPE_CLASSES["odd_sizes"], dtype, seed=11)
        norm = fusedclip.clip_grad_norm_(params, 0.2, backend=cpu_backend)
        results.append([norm, *grads(params)])
    assert_bitwise_equal(results[1], results[0])
    assert_bitwise_equal(results[2], results[0])


# ---- non-finite gradients --------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_matches_torch(cpu_backend, dtype, norm_type, bad):
    params = make_params(SHAPE_CLASSES["several"], dtype, seed=12)
    params[2].grad.view(-1)[41] = bad
    twin = clone_params(params)
    before = [g.clone() for g in grads(params)]
    ours = fusedclip.clip_grad_norm_(params, 1.0, norm_type, backend=cpu_backend)
    theirs = torch.nn.utils.clip_grad_norm_(twin, 1.0, norm_type)
    expected = math.nan if math.isnan(bad) else math.inf
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    torch.testing.assert_close(ours.double(), torch.tensor(expected, dtype=torch.float64),
                               equal_nan=True)
    for g, g0, t in zip(grads(params), before, grads(twin)):
        expected_g = oracle_clipped(g0, 1.0, expected)
        torch.testing.assert_close(g, expected_g, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(g, t, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_error_if_nonfinite_raises_and_leaves_grads(cpu_backend, norm_type, bad):
    params = make_params(SHAPE_CLASSES["several"], torch.bfloat16, seed=13)
    params[1].grad[5] = bad
    before = [g.clone() for g in grads(params)]
    with pytest.raises(RuntimeError, match="non-finite") as ours:
        fusedclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True,
                                  backend=cpu_backend)
    assert_bitwise_equal(grads(params), before)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, norm_type,
                                       error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.get_total_norm(before, norm_type, error_if_nonfinite=True, backend=cpu_backend)


def test_error_if_nonfinite_tests_the_returned_norm_like_torch(cpu_backend):
    # The fp16 norm of these gradients (60000 * 64) overflows fp16: torch raises, and so does
    # fusedclip, although it would clip them correctly with error_if_nonfinite=False.
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    p.grad = torch.full((4096,), 60000.0, dtype=torch.float16)
    (q,) = clone_params([p])
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_([q], 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.clip_grad_norm_([p], 1.0, error_if_nonfinite=True, backend=cpu_backend)
    assert_bitwise_equal([p.grad], [q.grad])


def test_error_if_nonfinite_with_finite_grads_clips(cpu_backend):
    params = make_params(SHAPE_CLASSES["several"], seed=14)
    check = clone_params(params)
    a = fusedclip.clip_grad_norm_(params, 0.5, error_if_nonfinite=True, backend=cpu_backend)
    b = fusedclip.clip_grad_norm_(check, 0.5, backend=cpu_backend)
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
    ours = fusedclip.clip_grad_norm_(emb.parameters(), 0.3, backend="reference")
    theirs = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.3)
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
