"""The fp64 reference backend (``fusedclip.reference``) against the independent oracle
(tests/oracle.py): exactness where torch's own arithmetic gives out, and each of its operations.
The other backends' expected values never come from it; this is where it earns its name."""

from __future__ import annotations

import math

import pytest
import torch
from gradients import DTYPES, NORM_TYPES, random_tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import (
    oracle_adaptive_clipped,
    oracle_clipped,
    oracle_coef,
    oracle_norm,
    oracle_scaled,
    ulp_close,
)

import fusedclip
from fusedclip import _select, reference
from fusedclip.backends import reference as backend_module

F64 = torch.float64


def test_public_module_is_the_backend():
    assert reference is backend_module is fusedclip.reference
    assert _select.get("reference") is reference and reference.NAME == "reference"
    assert reference.status().available and reference.status().devices is None


def test_fp64_norm_neither_overflows_nor_underflows():
    huge = [torch.full((1000,), 1e200, dtype=torch.float64)]
    tiny = [torch.full((1000,), 1e-200, dtype=torch.float64)]
    for p in (1.0, 2.0, 3.0, 0.5):
        assert math.isclose(float(reference.total_norm(huge, p)), 1e200 * 1000 ** (1 / p),
                            rel_tol=1e-13)
        assert math.isclose(float(reference.total_norm(tiny, p)), 1e-200 * 1000 ** (1 / p),
                            rel_tol=1e-13)


def test_clip_uses_the_norm_before_it_is_rounded_to_the_gradients_dtype():
    # The fp16 norm of these gradients overflows fp16 (torch then scales every gradient by 0); the
    # returned norm is fp32 (finite), and the coefficient comes from the fp64 norm.
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    p.grad = torch.full((4096,), 60000.0, dtype=torch.float16)
    norm = fusedclip.clip_grad_norm_([p], 1.0, backend="reference")
    assert norm.dtype == torch.float32 and float(norm) == 60000.0 * 64
    expected = 1.0 / (60000.0 * 64 + 1e-6) * 60000.0
    torch.testing.assert_close(p.grad.float(), torch.full((4096,), expected), rtol=1e-3, atol=0)


def test_scale_rounds_once():
    g = torch.randn(10000, dtype=torch.float64).to(torch.bfloat16)
    c = torch.tensor(0.123456789, dtype=torch.float64)
    expected = (g.double() * c).to(torch.bfloat16)
    reference.scale_([g], c)
    assert torch.equal(g, expected)


shapes = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1,
                  max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes,
    dtype=st.sampled_from(DTYPES),
    norm_type=st.one_of(st.sampled_from([1.0, 2.0, math.inf]), st.floats(0.25, 8.0)),
    factor=st.floats(0.01, 2.0),
    seed=st.integers(0, 2**16),
)
def test_clip_property(shapes, dtype, norm_type, factor, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    before = [t.clone() for t in tensors]
    exact = oracle_norm(before, norm_type)
    norm = reference.clip_(tensors, factor * exact, norm_type)
    assert math.isclose(float(norm), exact, rel_tol=1e-12, abs_tol=1e-300)
    for t, t0 in zip(tensors, before):
        ulp_close(t, oracle_clipped(t0, factor * exact, exact))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_nonfinite_elements(norm_type):
    """NaN anywhere gives NaN; otherwise an infinite element gives inf (as torch and the
    oracle)."""
    tensors = random_tensors([5, 0, 7], torch.float32, seed=1)
    tensors[2][3] = math.inf
    assert float(reference.total_norm(tensors, norm_type)) == math.inf
    assert oracle_norm(tensors, norm_type) == math.inf
    tensors[0][1] = math.nan
    assert math.isnan(float(reference.total_norm(tensors, norm_type)))
    assert math.isnan(oracle_norm(tensors, norm_type))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_clip_and_per_tensor_match_the_oracle(dtype, soft):
    sizes = [37, 0, 1, 4099, 300]
    tensors = random_tensors(sizes, dtype, seed=2)
    before = [t.clone() for t in tensors]
    exact = oracle_norm(before, 2.0)
    max_norm = 0.3 * exact
    norm = reference.clip_(tensors, max_norm, 2.0, soft=soft)
    assert norm.dtype == torch.float64
    assert math.isclose(float(norm), exact, rel_tol=1e-12)
    for t, t0 in zip(tensors, before):
        ulp_close(t, oracle_clipped(t0, max_norm, exact, soft))

    tensors = [t.clone() for t in before]
    limits = torch.tensor([0.5, 1.0, 0.0, 100.0, 2.0], dtype=torch.float64)
    norms = reference.clip_per_tensor_(tensors, limits, 2.0, soft)
    for i, (t, t0) in enumerate(zip(tensors, before)):
        own = oracle_norm([t0], 2.0)
        assert math.isclose(float(norms[i]), own, rel_tol=1e-12, abs_tol=0.0)
        ulp_close(t, oracle_clipped(t0, float(limits[i]), own, soft))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_amp_unscale_and_clip_match_the_oracle(dtype):
    """With ``inv_scale`` the norm is that of the unscaled values and one multiply unscales and
    clips; ``found_inf`` is set by an inf or NaN and only then."""
    scale = 1024.0
    tensors = random_tensors([33, 4099, 1], dtype, seed=3, scale=scale)
    before = [t.clone() for t in tensors]
    inv = torch.tensor([1 / scale], dtype=torch.float32)
    found = torch.zeros(1)
    exact = oracle_norm(before, 2.0) / scale
    norm = reference.clip_(tensors, 0.5 * exact, 2.0, inv_scale=inv, found_inf=found)
    assert math.isclose(float(norm), exact, rel_tol=1e-12)
    assert float(found) == 0.0
    coef = oracle_coef(0.5 * exact, exact) / scale
    for t, t0 in zip(tensors, before):
        ulp_close(t, oracle_scaled(t0, coef))
    before[1][7] = math.inf
    reference.total_norm(before, 2.0, inv, found)
    assert float(found) == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adaptive_clip_matches_the_oracle(dtype):
    gen = torch.Generator().manual_seed(4)
    shapes = [(16, 9), (7,), (3, 4, 5), (0,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen, dtype=torch.float64) * 0.05).to(dtype)
             for s in shapes]
    before = [g.clone() for g in grads]
    reference.adaptive_clip_(grads, params, 0.01, 1e-3, 2.0)
    changed = False
    for g, g0, p in zip(grads, before, params):
        ulp_close(g, oracle_adaptive_clipped(g0, p, 0.01, 1e-3, 2.0))
        changed |= not torch.equal(g, g0)
    assert changed  # some unit was over its limit


def test_sparse_and_complex_gradients():
    """What the kernels do not take: sparse COO gradients (duplicates summed, as coalescing
    does) and complex ones (norms of |z|, computed in complex128)."""
    indices = torch.tensor([[0, 2, 2, 5]])
    sparse = torch.sparse_coo_tensor(indices, torch.tensor([3.0, -1.0, 5.0, 2.0]), (8,),
                                     check_invariants=True)
    dense = sparse.to_dense()
    cplx = torch.randn(6, dtype=torch.complex128, generator=torch.Generator().manual_seed(5))
    for norm_type in NORM_TYPES:
        exact = oracle_norm([dense, cplx.abs()], norm_type)
        got = reference.total_norm([sparse, cplx], norm_type)
        assert math.isclose(float(got), exact, rel_tol=1e-12), norm_type
    exact = oracle_norm([dense, cplx.abs()], 2.0)
    twin = cplx.clone()
    reference.clip_([sparse, twin], 1.0, 2.0)
    coef = oracle_coef(1.0, exact)
    ulp_close(sparse.to_dense(), oracle_scaled(dense, coef))  # (each stored value rounded)
    torch.testing.assert_close(twin, cplx * coef, rtol=1e-15, atol=0)


def test_clamp_is_torch_s():
    g = torch.tensor([-3.0, -0.5, 0.0, -0.0, 0.25, 7.0, math.nan, -math.inf])
    ours, theirs = g.clone(), g.clone()
    reference.clamp_([ours], 0.5)
    theirs.clamp_(-0.5, 0.5)
    assert torch.equal(ours.view(torch.int32)[:6], theirs.view(torch.int32)[:6])
    assert math.isnan(float(ours[6])) and float(ours[7]) == -0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_clamp_bound_past_the_dtype_rounds_as_the_engines_do(dtype):
    """Past the dtype's largest value torch's clamp refuses the bound; the reference rounds it as
    the compiled engines do (csrc/engine/norm_math.h bound_as: to fp32, then to the dtype), to
    that largest value within half a step of it, else to inf, which clamps nothing."""
    top = torch.finfo(dtype).max
    gen = torch.Generator().manual_seed(25)
    above = [top * (1 + 0.02 * float(u)) for u in torch.rand(500, generator=gen, dtype=F64)]
    eps = torch.finfo(dtype).eps
    above += [top * (1 + eps / 4), top * (1 + eps / 2), top * (1 + eps), 65520.0, 1e5, 1e39]
    g = torch.tensor([-math.inf, -top, 1.0, top, math.inf], dtype=dtype)
    for v in (v for v in above if v > top):
        expected = float(torch.tensor(v, dtype=F64).to(torch.float32).to(dtype))
        ours = g.clone()
        reference.clamp_([ours], v)
        torch.testing.assert_close(ours, g.clamp(-expected, expected), rtol=0, atol=0)
        assert math.isinf(expected) or expected == top
