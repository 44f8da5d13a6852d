"""Shrunk failures of the fuzzer (test_fuzz.py), kept as explicit tests on every backend of the
matrix, each naming what it found. A new one: paste the ``Case`` hypothesis prints into
``CASES`` with the property it broke and a line on the defect (or write the call out, as the
tests below do, where that reads better). A defect not fixed yet: a strict xfail naming it."""

from __future__ import annotations

import math

import properties
import pytest
import torch
from oracle import oracle_adaptive_clipped, oracle_norm, ulp_close
from strategies import Case, Grad

import fusedclip
from fusedclip.backends import triton as triton_backend

# (property, case, what it found)
CASES = [
    ("check_clip_grad_norm",
     Case(grads=(Grad(dtype=torch.float32, shape=(0,)),), norm_type=-1.0),
     "torch writes p = -1.0 as '-1' in its no-identity error, fusedclip as '-1.0' "
     "(docs/errors.md): the property compares the words but for the number"),
    ("check_clip_grad_norm", Case(grads=(), form="generator"),
     "an empty generator of parameters warns, as torch's does"),
    ("check_clip_grad_value", Case(grads=()),
     "torch 2.14's clip_grad_value_ fails on an empty list (foreach); fusedclip does nothing"),
    ("check_get_total_norm",
     Case(grads=(Grad(dtype=torch.float32, shape=(0,)),
                 Grad(dtype=torch.float32, shape=(3,), specials=((0, "inf"),))),
          norm_type=math.inf, error_if_nonfinite=True),
     "torch raises its empty-tensor error for the max norm before error_if_nonfinite's; "
     "fusedclip takes the empty tensor (docs/differences.md) and raises the non-finite error"),
    ("check_amp",
     Case(grads=(Grad(dtype=torch.float32, shape=(0,)), Grad(dtype=torch.float32, shape=(3,))),
          sharing=("same", 0), extra=2.0),
     "one empty gradient object owned by two parameters: the reference's AMP path refuses it "
     "(owned twice), the compiled engine's one-call path takes it (it shares no element)"),
    ("check_amp",
     Case(grads=(Grad(dtype=torch.float64, shape=(2,), specials=((0, "max"),)),), extra=0.125),
     "a scale below 1 unscales fp64's largest value past its range; torch's unscale_ (and "
     "fusedclip) check the stored values for found_inf, not the products"),
    ("check_per_tensor", Case(grads=(), max_norm=("abs", -1.0)),
     "a negative max_norm is refused even without gradients"),
    ("check_amp",
     Case(grads=(Grad(dtype=torch.float64, shape=(2,), magnitude="subnormal"),), extra=0.125),
     "a subnormal fp64 norm is rounded before it is unscaled (x8): 4 subnormal steps off"),
    ("check_clip_grad_norm",
     Case(grads=(Grad(dtype=torch.float16, shape=(65535,)),), norm_type=-1.0),
     "torch's own -1 norm of 65535 fp16 values is 1.2% off the fp64 one: not compared"),
    ("check_clip_grads_with_norm",
     (Case(grads=(Grad(dtype=torch.float32, shape=(2,)),), max_norm=("abs", 1e300),
           extra=math.inf), torch.float32),
     "torch's coefficient is computed in total_norm's dtype (fp32): max_norm 1e300 is inf "
     "there and inf / inf NaN; fusedclip's fp64 coefficient is 0"),
    ("check_clip_grad_norm",
     Case(grads=(Grad(dtype=torch.float16, shape=(41,), magnitude="huge"),),
          max_norm=("abs", 0.125)),
     "torch rounds its coefficient (2.2e-6) to fp16, where it is subnormal: 1.1% off; the "
     "comparison with torch allows for that rounding"),
    ("check_adaptive",
     Case(grads=(Grad(dtype=torch.float64, shape=(2,), specials=((0, "max"),)),), extra=0.001),
     "the reference's unit norms overflowed for fp64 gradients near 1.8e308 (fixed)"),
]


@pytest.mark.parametrize("check, case, found", CASES, ids=[c[0] + str(i)
                                                           for i, c in enumerate(CASES)])
def test_shrunk_case(backend, device, check, case, found):
    args = case if isinstance(case, tuple) else (case,)
    getattr(properties, check)(backend, device, *args)


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


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_bf16_subnormal_norm(request, backend, device, norm_type):
    """bf16 subnormals (2^-133 .. 2^-127). Triton 3.8's CPU interpreter converts them to fp32
    wrongly (triton/runtime/interpreter.py ``_convert_float``: 2^-130 reads as 0, -3 * 2^-133 as
    -2^-127), so the Triton kernels' norm of them is wrong in the interpreter (5.9e-39 for an
    inf-norm of 7.3e-40); a GPU converts bf16 by a shift. The fuzzer leaves bf16 subnormals out of
    its Triton runs in the interpreter until the kernels read bf16 as bits."""
    if backend == "triton" and triton_backend.interpreting():
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "Triton 3.8's interpreter converts bf16 subnormals to fp32 wrongly")))
    x = torch.tensor([2.0**-133, 2.0**-130, -3 * 2.0**-133], dtype=torch.float64)
    g = x.to(torch.bfloat16).to(device)
    norm = fusedclip.get_total_norm([g], norm_type, backend=backend)
    properties.assert_norm(norm, oracle_norm([g], norm_type), torch.float32)
