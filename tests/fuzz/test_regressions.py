"""Shrunk failures of the fuzzer (test_fuzz.py), kept as explicit tests on every backend of the
matrix: each names what it found. A new one: paste the ``Case`` hypothesis prints into
``CASES`` (or write the call out, as below, where it reads better), with the defect's name."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_adaptive_clipped, ulp_close

import fusedclip


def test_adaptive_unit_norm_of_huge_fp64_gradient(backend, device):
    """The reference's unit norms were torch.linalg.vector_norm's, unscaled: an fp64 gradient
    holding 1.8e308 had an infinite unit norm, so its unit was scaled by 0 instead of down to
    the limit (the fused backends divide by the largest magnitude first)."""
    g = torch.tensor([1.7976931348623157e308, -0.29343], dtype=torch.float64, device=device)
    p = torch.nn.Parameter(torch.tensor([0.6614, 0.2669], dtype=torch.float64, device=device))
    p.grad = g.clone()
    fusedclip.adaptive_clip_grad_([p], 0.001, 1e-3, 2.0, backend=backend)
    ulp_close(p.grad, oracle_adaptive_clipped(g, p.detach(), 0.001, 1e-3, 2.0))
    assert float(p.grad[0]) == pytest.approx(0.001 * float(p.detach().norm()), rel=1e-12)
