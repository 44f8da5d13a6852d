"""Norms at the edges of the fp64 range, on every backend: finite wherever the fp64 oracle's norm
is finite in the returned dtype (and not where it is not), whatever p.

A p-norm is formed as ``m * s^(1/p)`` (m the largest magnitude, s the sum of (|x| / m)^p). For a
small p, ``s^(1/p)`` alone overflows long before m brings the product back (2000 elements of
1e-100 and p = 0.01: ``2000^100 = 1e330``, the norm 1.3e230), and a ratio ``|x| / m`` below the
normal range flushes to 0 although its p-th power still counts (``(1e-400)^0.01 = 1e-4``). Every
backend used to return inf (and zero the gradients) in the first case, and drop the tiny elements
in the second. The oracle (tests/oracle.py) computes both in log space.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracle import (
    assert_bitwise_equal,
    assert_norm_close,
    oracle_clipped,
    oracle_coef,
    oracle_norm,
    oracle_norm_dtype,
    ulp_close,
)

import fusedclip
from fusedclip import _select
from fusedclip.backends._math import combine_norms, general_norm

F64 = torch.float64


def _cases(device):
    """Gradient sets whose norms sit at the edges, by name."""
    return {
        # s^(1/p) overflows for a small p; the norm itself does not (below p = 0.0034 it does).
        "tiny_many": [torch.full((2000,), 1e-100, dtype=F64, device=device)],
        # Ratios below the normal range, inside one chunk...
        "tiny_beside_huge": [torch.tensor([1e100, 1e-300, -1e-300, 3e-310], dtype=F64,
                                          device=device)],
        # ...and between chunks and tensors (70000 elements: two chunks).
        "tiny_tensor_beside_huge": [torch.tensor([1e100], dtype=F64, device=device),
                                    torch.full((70000,), 1e-300, dtype=F64, device=device)],
        # The norm overflows fp64 for small p, and is finite for p >= 1.
        "huge_many": [torch.full((2000,), 1e300, dtype=F64, device=device)],
        # Finite in fp64, but past float32, the returned dtype, for p = 2.
        "past_fp32": [torch.full((1000,), 3e38, dtype=torch.float32, device=device)],
        "subnormal": [torch.tensor([5e-324, 1e-310, 0.0], dtype=F64, device=device)],
    }


CASES = ["tiny_many", "tiny_beside_huge", "tiny_tensor_beside_huge", "huge_many", "past_fp32",
         "subnormal"]
NORM_TYPES = [0.001, 0.01, 0.5, 2.0, 3.0, 100.0, math.inf]


def _params(tensors):
    params = []
    for t in tensors:
        p = torch.nn.Parameter(torch.zeros_like(t))
        p.grad = t.clone()
        params.append(p)
    return params


def _as_returned(exact: float, tensors) -> float:
    """The oracle's fp64 norm as a norm of ``tensors`` is returned (inf past the dtype's range)."""
    return float(torch.tensor(exact, dtype=F64).to(oracle_norm_dtype(tensors)))


def test_small_p_norm_of_tiny_elements_as_torch(backend, device):
    """The issue's example: torch's norm, 1.27e230; not inf, and the gradients not zeroed."""
    g = torch.full((2000,), 1e-100, dtype=F64, device=device)
    theirs = torch.nn.utils.get_total_norm([g], 0.01)
    assert 1e230 < float(theirs) < 2e230
    exact = oracle_norm([g], 0.01)  # 2^100 * 1e200; torch's is 3.5e-12 off it
    ours = fusedclip.get_total_norm([g], 0.01, backend=backend)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)
    assert_norm_close(ours, exact)
    params = _params([g])
    norm = fusedclip.clip_grad_norm_(params, exact / 2, 0.01, backend=backend)
    assert_norm_close(norm, exact)
    ulp_close(params[0].grad, oracle_clipped(g, exact / 2, exact))
    assert float(params[0].grad[0]) == pytest.approx(0.5e-100, rel=1e-6)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_norm_is_finite_wherever_the_oracles_is(backend, device, case, norm_type):
    tensors = _cases(device)[case]
    exact = oracle_norm(tensors, norm_type)
    returned = _as_returned(exact, tensors)
    dtype = oracle_norm_dtype(tensors)
    ours = fusedclip.get_total_norm(tensors, norm_type, backend=backend)
    assert math.isfinite(float(ours)) == math.isfinite(returned)
    assert_norm_close(ours, returned, dtype)
    params = _params(tensors)
    max_norm = exact / 2 if 0 < exact < math.inf else 1.0
    stats = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend,
                                      return_stats="per_tensor")
    assert_norm_close(stats.total_norm, returned, dtype)
    # The coefficient comes from the unrounded fp64 norm: 0.5 wherever that is finite.
    assert_norm_close(stats.clip_coef, oracle_coef(max_norm, exact))
    for n, t in zip(stats.per_tensor_norms.tolist(), tensors):
        assert_norm_close(n, oracle_norm([t], norm_type))
    for p, t in zip(params, tensors):
        ulp_close(p.grad, oracle_clipped(t, max_norm, exact))


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_error_if_nonfinite_exactly_where_the_oracle_is_not_finite(backend, device, case,
                                                                   norm_type):
    """No spurious error where the norm is finite in the returned dtype, and no missing one where
    it is not (then nothing is written)."""
    tensors = _cases(device)[case]
    exact = oracle_norm(tensors, norm_type)
    params = _params(tensors)
    if math.isfinite(_as_returned(exact, tensors)):
        fusedclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True,
                                  backend=backend)
        for p, t in zip(params, tensors):
            ulp_close(p.grad, oracle_clipped(t, 1.0, exact))
    else:
        with pytest.raises(RuntimeError, match="is non-finite"):
            fusedclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True,
                                      backend=backend)
        assert_bitwise_equal([p.grad for p in params], tensors)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_per_tensor_clipping_at_the_edges(backend, device, case, norm_type):
    tensors = _cases(device)[case]
    params = _params(tensors)
    exact = [oracle_norm([t], norm_type) for t in tensors]
    norms = fusedclip.clip_grad_norm_per_tensor_(params, 1.0, norm_type, backend=backend)
    for n, e, t in zip(norms.tolist(), exact, tensors):
        assert_norm_close(n, _as_returned(e, [t]), oracle_norm_dtype([t]))
    for p, e, t in zip(params, exact, tensors):
        ulp_close(p.grad, oracle_clipped(t, 1.0, e))


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_partials_and_their_finish_at_the_edges(backend, device, case, norm_type):
    """BackwardClipper's path: each tensor's (m, s) row (partials_), then the finish over the
    rows (finish_partials), which must be as finite as pass 1's own finish."""
    tensors = _cases(device)[case]
    impl = _select.get(backend)
    rows = torch.full((len(tensors), 2), math.nan, dtype=F64, device=device)
    impl.partials_(tensors, norm_type, rows)
    norm, coef = impl.finish_partials(rows, norm_type, 1.0)
    exact = oracle_norm(tensors, norm_type)
    assert_norm_close(norm, exact)
    assert_norm_close(coef, oracle_coef(1.0, exact))


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 0.5])
def test_unscaled_norm_finite_where_the_scaled_one_is_not(backend, device, norm_type):
    """The AMP finish: m * s^(1/p) overflows fp64, but times the inverse loss scale it does not;
    the norm of the unscaled elements is returned, as its own finite value."""
    tensors = [torch.full((4,), 1.5e308, dtype=F64, device=device)]
    impl = _select.get(backend)
    rows = torch.zeros((1, 2), dtype=F64, device=device)
    impl.partials_(tensors, norm_type, rows)
    inv = torch.tensor(2.0**-10, device=device)
    norm, coef = impl.finish_partials(rows, norm_type, 1.0, inv)
    expected = 1.5e308 * 2.0**-10 * 4 ** (1 / norm_type)
    assert_norm_close(norm, expected)
    assert_norm_close(coef, oracle_coef(1.0, expected) * 2.0**-10)
    assert_norm_close(impl.total_norm(tensors, norm_type, inv), expected)


def test_negative_p_norm_does_not_underflow(backend, device):
    """The general path's p < 0: ``s^(1/p)`` underflows for a small |p| where the norm is not 0
    (2000 elements of 1e300, p = -0.01: 2^-100); torch's value."""
    tensors = [torch.full((2000,), 1e300, dtype=F64, device=device)]
    theirs = torch.nn.utils.get_total_norm(tensors, -0.01)
    assert 0 < float(theirs) < 1e-29
    ours = fusedclip.get_total_norm(tensors, -0.01, backend=backend)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)
    torch.testing.assert_close(general_norm(tensors, -0.01), theirs, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "parts, norm_type",
    [
        # Three norms of 1e-300 and p = 0.001: sum^(1/p) = 3^1000 overflows, the norm 1.3e177.
        ([[1e-300], [1e-300], [1e-300]], 0.001),
        # A norm 1e-400 times the largest: its ratio flushes to 0, its power is 1e-4.
        ([[1e100], [1e-300]], 0.01),
        ([[1e300] * 3, [1e300]], 0.01),  # inf: the norm overflows
        ([[1.0, 2.0], [3.0]], 2.0),
    ],
)
def test_combine_norms_at_the_edges(parts, norm_type):
    """The combination of several devices' norms (fusedclip.backends._math.combine_norms)."""
    sets = [torch.tensor(p, dtype=F64) for p in parts]
    norms = [torch.tensor(oracle_norm([s], norm_type), dtype=F64) for s in sets]
    assert_norm_close(combine_norms(norms, norm_type), oracle_norm(sets, norm_type))
