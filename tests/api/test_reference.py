"""Properties of the fp64 reference itself: exactness where torch's own arithmetic gives out."""

from __future__ import annotations

import math

import torch
from conftest import DTYPES, oracle_clipped, oracle_norm, ulp_close
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip import reference


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
    # returned norm has torch's dtype, but the coefficient comes from the fp64 norm.
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    p.grad = torch.full((4096,), 60000.0, dtype=torch.float16)
    norm = fusedclip.clip_grad_norm_([p], 1.0, backend="reference")
    assert norm.dtype == torch.float16 and math.isinf(float(norm))
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
