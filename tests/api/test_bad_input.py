"""Bad input: a clear error naming the problem, and not one gradient changed.

Every call that reaches a backend runs for every backend on every device (conftest's ``backend``
x ``device`` matrix; a pair that cannot run here is a visible skip): the checks must come before
anything is touched on every path, the one-call fast paths of the compiled backends included.
"""

from __future__ import annotations

import builtins
import dataclasses
import math
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from gradients import SHAPE_CLASSES, grads, make_params
from oracle import assert_bitwise_equal, oracle_adaptive_clipped, ulp_close

import fusedclip
from fusedclip import _select

CALLS = {
    "clip_grad_norm_": lambda params, **kw: fusedclip.clip_grad_norm_(params, 1.0, **kw),
    "clip_grads_with_norm_": lambda params, **kw: fusedclip.clip_grads_with_norm_(
        params, 1.0, torch.tensor(100.0), **kw),
    "clip_grad_value_": lambda params, **kw: fusedclip.clip_grad_value_(params, 0.1, **kw),
}
CHOOSE = "choose one of 'auto', 'cpp', 'triton', 'reference'"


@pytest.fixture
def params(device):
    """Gradients on the matrix's device."""
    return make_params(SHAPE_CLASSES["several"], torch.float32, device=device, seed=21)


@pytest.fixture
def cpu_params():
    """Gradients for errors that come before any backend is chosen (the backend's name)."""
    return make_params(SHAPE_CLASSES["several"], torch.float32, seed=21)


def _values(g):
    return g.to_dense() if g.is_sparse else g


def expect_untouched(params, error, match, call):
    """``call()`` raises ``error`` matching ``match``, and every gradient keeps its bits."""
    before = [_values(g).clone() for g in grads(params)]
    with pytest.raises(error, match=match):
        call()
    assert_bitwise_equal([_values(g) for g in grads(params)], before)


@pytest.mark.parametrize("max_norm", [-1.0, -1e-30, math.nan, -math.inf])
def test_bad_max_norm(params, backend, max_norm):
    expect_untouched(params, ValueError, "max_norm must be a non-negative number",
                     lambda: fusedclip.clip_grad_norm_(params, max_norm, backend=backend))
    expect_untouched(params, ValueError, "max_norm must be a non-negative number",
                     lambda: fusedclip.clip_grads_with_norm_(params, max_norm, torch.tensor(9.0),
                                                             backend=backend))


@pytest.mark.parametrize(
    "max_norm, error", [("1.0x", ValueError), (None, TypeError), (torch.ones(2), TypeError)]
)
def test_max_norm_not_a_number(params, backend, max_norm, error):
    # float()'s own error class, as torch (which calls float()) raises.
    expect_untouched(params, error, "max_norm must be a number",
                     lambda: fusedclip.clip_grad_norm_(params, max_norm, backend=backend))


def test_max_norm_edge_values_are_accepted(params, backend, device):
    twin = make_params(SHAPE_CLASSES["several"], torch.float32, device=device, seed=21)
    fusedclip.clip_grad_norm_(params, math.inf, backend=backend)
    assert_bitwise_equal(grads(params), grads(twin))
    fusedclip.clip_grad_norm_(params, torch.tensor(0.0), backend=backend)
    assert all(not g.any() for g in grads(params))


@pytest.mark.parametrize("norm_type", [0, 0.0, -1.0, -math.inf, "-inf"])
def test_norm_types_that_only_torchs_functions_take(params, backend, norm_type):
    """0, negative p and -inf: clip_grad_norm_ and get_total_norm take them as torch does
    (tests/api/test_parity.py); fusedclip's own functions, and the AMP and spread paths, refuse
    them before anything is touched."""
    device = params[0].device
    for call in (lambda: fusedclip.clip_grad_norm_per_tensor_(params, 1.0, norm_type,
                                                               backend=backend),
                 lambda: fusedclip.adaptive_clip_grad_(params, norm_type=norm_type,
                                                       backend=backend),
                 lambda: fusedclip.AutoClipper(params, norm_type=norm_type, backend=backend)):
        expect_untouched(params, ValueError, "takes norm_type p > 0 or inf", call)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler(device.type)
    expect_untouched(params, ValueError, "not available with scaler=",
                     lambda: fusedclip.clip_grad_norm_(params, 1.0, norm_type, scaler=scaler,
                                                       optimizer=opt, backend=backend))
    expect_untouched(params, ValueError, "not available with process_group=",
                     lambda: fusedclip.get_total_norm(grads(params), norm_type, backend=backend,
                                                      process_group=object()))


@pytest.mark.parametrize("norm_type", [math.nan, -math.nan, "nan", torch.tensor(math.nan)],
                         ids=["nan", "-nan", "'nan'", "tensor"])
def test_nan_norm_type_is_refused(backend, device, norm_type):
    """torch returns a NaN norm for it and writes NaN into the gradients (or, for one element,
    returns that element): every function refuses it, before anything is touched."""
    params = make_params([(1,)], torch.float32, device=device, seed=23)
    params[0].grad.fill_(4.0)
    params += make_params(SHAPE_CLASSES["several"], torch.float32, device=device, seed=23)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler(params[0].device.type)
    match = "norm_type must not be NaN"
    for call in (
        lambda: fusedclip.clip_grad_norm_(params, 1.0, norm_type, backend=backend),
        lambda: fusedclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True,
                                          return_stats="per_tensor", backend=backend),
        lambda: fusedclip.clip_grad_norm_(params, 1.0, norm_type, scaler=scaler, optimizer=opt,
                                          backend=backend),
        lambda: fusedclip.get_total_norm(grads(params), norm_type, backend=backend),
        lambda: fusedclip.clip_grad_norm_per_tensor_(params, 1.0, norm_type, backend=backend),
        lambda: fusedclip.adaptive_clip_grad_(params, norm_type=norm_type, backend=backend),
        lambda: fusedclip.AutoClipper(params, norm_type=norm_type, backend=backend),
    ):
        expect_untouched(params, ValueError, match, call)
    assert float(params[0].grad) == 4.0


@pytest.mark.parametrize("norm_type", [-1.0, -0.5, -math.inf])
def test_negative_norm_of_an_empty_tensor_refused_as_torch(backend, device, norm_type):
    """torch has no p < 0 or -inf norm of an empty tensor (no identity for the reduction): the
    same error, before anything is touched."""
    params = make_params([(5, 3), (0,), (4,)], torch.float32, device=device, seed=22)
    with pytest.raises(RuntimeError, match="on an empty tensor") as theirs:
        torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type)
    for call in (lambda: fusedclip.clip_grad_norm_(params, 1.0, norm_type, backend=backend),
                 lambda: fusedclip.get_total_norm(grads(params), norm_type, backend=backend)):
        expect_untouched(params, RuntimeError, "on an empty tensor", call)
    assert "does not have an identity" in str(theirs.value)


@pytest.mark.parametrize("norm_type, error", [("fro", ValueError), ("nuc", ValueError),
                                              (None, TypeError)])
def test_norm_type_not_a_number(params, backend, norm_type, error):
    expect_untouched(params, error, "norm_type must be a number",
                     lambda: fusedclip.clip_grad_norm_(params, 1.0, norm_type, backend=backend))
    with pytest.raises(error):
        torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type)


def test_string_inf_norm_type_is_accepted_as_in_torch(params, backend):
    ours = fusedclip.clip_grad_norm_(params, 1e9, "inf", backend=backend)
    assert float(ours) == max(float(g.abs().max()) for g in grads(params))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_non_tensor_in_parameters(params, backend, name):
    mixed = params[:2] + ["not a tensor"] + params[2:]
    expect_untouched(params, TypeError, r"parameters\[2\] is a str, expected a torch.Tensor",
                     lambda: CALLS[name](mixed, backend=backend))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_parameters_not_iterable(name):
    with pytest.raises(TypeError, match="parameters must be a Tensor or an iterable of Tensors"):
        CALLS[name](3.5)


def test_non_tensor_in_get_total_norm(params, backend):
    with pytest.raises(TypeError, match=r"tensors\[1\] is a float"):
        fusedclip.get_total_norm([grads(params)[0], 1.0], backend=backend)


@pytest.mark.parametrize("clip_value", [-0.5, math.nan])
def test_bad_clip_value(params, backend, clip_value):
    expect_untouched(params, ValueError, "clip_value must be a non-negative number",
                     lambda: fusedclip.clip_grad_value_(params, clip_value, backend=backend))


@pytest.mark.parametrize(
    "total_norm, error, match",
    [
        (torch.ones(2), ValueError, "total_norm must hold one value"),
        (torch.tensor(True), TypeError, "total_norm must be a real tensor"),
        (torch.tensor(1 + 1j), TypeError, "total_norm must be a real tensor"),
        ("big", ValueError, "total_norm must be a number"),
    ],
)
def test_bad_total_norm(params, backend, total_norm, error, match):
    expect_untouched(params, error, match,
                     lambda: fusedclip.clip_grads_with_norm_(params, 1.0, total_norm,
                                                             backend=backend))


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("requested", ["cudnn", "", "fast", "cuda-ops-on-cpu"])
def test_unknown_backend(cpu_params, name, requested):
    expect_untouched(cpu_params, ValueError,
                     f"unknown backend '{requested}' \\(from backend=\\); {CHOOSE}",
                     lambda: CALLS[name](cpu_params, backend=requested))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_backend_of_wrong_type(cpu_params, name):
    expect_untouched(cpu_params, TypeError, "backend must be a string",
                     lambda: CALLS[name](cpu_params, backend=1))


def _switch_off(monkeypatch, backend, available, devices):
    """Backend ``backend`` as if it could not run here (or not on these devices)."""
    status = _select.BackendStatus(available, "test: switched off", devices)
    impl = _select.get(backend)
    if hasattr(impl, "_status"):  # the fused backends keep the status they found
        monkeypatch.setattr(impl, "_status", status)
    else:
        monkeypatch.setattr(impl, "status", lambda: status)
    assert _select.backend_status(backend) == status


@pytest.mark.parametrize("name", sorted(CALLS))
def test_unavailable_backend_is_an_error_not_a_fallback(params, backend, device, name,
                                                        monkeypatch):
    _switch_off(monkeypatch, backend, False, ())
    expect_untouched(params, RuntimeError,
                     f"backend '{backend}' \\(from backend=\\) cannot run here: test: switched off",
                     lambda: CALLS[name](params, backend=backend))
    monkeypatch.setenv("FUSEDCLIP_BACKEND", backend)  # named by the environment: the same
    expect_untouched(params, RuntimeError,
                     f"backend '{backend}' \\(from FUSEDCLIP_BACKEND\\) cannot run here",
                     lambda: CALLS[name](params))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_backend_that_runs_other_devices_is_an_error(params, backend, device, name, monkeypatch):
    """As Triton (not interpreting) on CPU tensors, or an engine built without CUDA kernels."""
    other = "cuda" if device == "cpu" else "cpu"
    if other == "cpu" and name == "clip_grad_norm_" and backend != "reference":
        pytest.skip("the one-call path of clip_grad_norm_ takes CUDA gradients from what was "
                    "built, not from the status this test changes")
    _switch_off(monkeypatch, backend, True, (other,))
    expect_untouched(params, RuntimeError,
                     f"backend '{backend}' \\(from backend=\\) runs {other} tensors here, but "
                     f"gradients\\[0\\] is on {device}",
                     lambda: CALLS[name](params, backend=backend))


def test_unknown_backend_from_environment(cpu_params, monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "turbo")
    expect_untouched(cpu_params, ValueError,
                     f"unknown backend 'turbo' \\(from FUSEDCLIP_BACKEND\\); {CHOOSE}",
                     lambda: fusedclip.clip_grad_norm_(cpu_params, 1.0))


def test_integer_total_norm_is_accepted_as_in_torch(params, backend, device):
    twin = make_params(SHAPE_CLASSES["several"], torch.float32, device=device, seed=21)
    fusedclip.clip_grads_with_norm_(params, 1.0, torch.tensor(50), backend=backend)
    torch.nn.utils.clip_grads_with_norm_(twin, 1.0, torch.tensor(50))
    for g, t in zip(grads(params), grads(twin)):
        torch.testing.assert_close(g, t)


def test_integer_tensors_have_no_norm(backend, device):
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        fusedclip.get_total_norm([torch.randn(3, device=device), torch.arange(5, device=device)],
                                 backend=backend)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_self_overlapping_grad_is_refused_before_any_change(params, backend, device, name):
    p = torch.nn.Parameter(torch.zeros(4, 3, device=device))
    p.grad = torch.randn(1, 3, device=device).expand(4, 3)
    expect_untouched(params + [p], ValueError, r"gradients\[4\] has elements that share memory",
                     lambda: CALLS[name](params + [p], backend=backend))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_unknown_backend_is_reported_without_grads(name):
    no_grad = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="unknown backend"):
        CALLS[name](no_grad, backend="turbo")
    with pytest.raises(ValueError, match="unknown backend"):
        fusedclip.get_total_norm([], backend="turbo")


# ---- memory shared between gradients, or within one --------------------------------------------
# One rule on every backend and every function: an element shared between two gradients, or
# stored twice in one, is refused with a ValueError naming them, before anything is written
# (torch would scale such an element once per appearance).

WRITERS = {
    **CALLS,
    "clip_grad_norm_-general": lambda params, **kw: fusedclip.clip_grad_norm_(
        params, 1.0, error_if_nonfinite=True, return_stats="per_tensor", **kw),
    "clip_grad_norm_per_tensor_": lambda params, **kw: fusedclip.clip_grad_norm_per_tensor_(
        params, 1.0, **kw),
    "adaptive_clip_grad_": lambda params, **kw: fusedclip.adaptive_clip_grad_(params, 1e-3, **kw),
    "get_total_norm": lambda params, **kw: fusedclip.get_total_norm(grads(params), **kw),
}


def _sharing(case, device):
    """Gradients (for parameters 4 and up, after the ``params`` fixture's) that share memory."""
    b = torch.randn(16, device=device)
    return {
        "the same twice": [b, b],
        "one with gaps twice": [b[::2], b[::2]],
        "dense and a view with gaps": [b, b[::2]],
        "a view with gaps and dense": [b[1::2], b],
        "overlapping slices": [b[:8], b[4:12]],
        "transposed and a slice": [b.view(4, 4).t(), b[5:6]],
        "the same bytes as two dtypes": [b[:4], b[:4].view(torch.bfloat16)[3:]],
        "expand": [torch.randn(1, 3, device=device).expand(4, 3)],
        "as_strided onto itself": [b.as_strided((4, 3), (2, 1))],
    }[case]


def _params_for(grad_list):
    params = []
    for g in grad_list:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype, device=g.device))
        p.grad = g
        params.append(p)
    return params


SHARING = ["the same twice", "one with gaps twice", "dense and a view with gaps",
           "a view with gaps and dense", "overlapping slices", "transposed and a slice",
           "the same bytes as two dtypes", "expand", "as_strided onto itself"]


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize("case", SHARING)
def test_memory_shared_between_or_within_gradients_is_refused(params, backend, case, name):
    device = params[0].device
    sharing = _params_for(_sharing(case, device))
    everything = params + sharing
    what = "tensors" if name == "get_total_norm" else "gradients"
    if len(sharing) == 1:
        match = (rf"^{what}\[4\] has elements that share memory \(an expand\(\)-ed or "
                 r"overlapping as_strided view\); fusedclip takes every element once: give it "
                 r"its own storage \(\.clone\(\)\)$")
    else:
        match = (rf"^{what}\[4\] and {what}\[5\] share memory \(the same tensor twice, or views "
                 r"of one buffer\); fusedclip takes every element once: give each its own "
                 r"storage \(\.clone\(\)\)$")
    base = [g._base if g._base is not None else g for g in grads(sharing)]
    before = [t.clone() for t in base]
    expect_untouched(everything, ValueError, match, lambda: WRITERS[name](everything,
                                                                          backend=backend))
    assert_bitwise_equal(base, before)


def test_the_one_call_path_refuses_as_the_general_path(backend, device):
    """Dense gradients that share memory reach the compiled engine's plan first on the one-call
    path of clip_grad_norm_ and clip_grad_value_: the same words."""
    g = torch.randn(6, device=device)
    params = _params_for([g, g])
    messages = set()
    for call in (lambda: fusedclip.clip_grad_norm_(params, 1.0, backend=backend),
                 lambda: fusedclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True,
                                                   backend=backend),
                 lambda: fusedclip.clip_grad_value_(params, 0.1, backend=backend),
                 lambda: fusedclip.clip_grads_with_norm_(params, 1.0, 9.0, backend=backend)):
        with pytest.raises(ValueError, match="share memory") as info:
            call()
        messages.add(str(info.value))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_views_that_share_no_element_are_taken(backend, device, name):
    """Spans that meet without a shared element: interleaved views, and an as_strided view whose
    strides interleave without overlapping (offsets 0 3 6 / 2 5 8 / 4 7 10): the results of the
    same call on gradients of their own."""
    b = torch.randn(24, device=device)
    views = [b[0:12:2], b[1:12:2], b[12:].as_strided((3, 3), (2, 3))]
    copies = [v.clone() for v in views]
    ours = WRITERS[name](_params_for(views), backend=backend)
    theirs = WRITERS[name](_params_for(copies), backend=backend)
    if isinstance(ours, torch.Tensor):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    assert_bitwise_equal(views, copies)


def test_spans_that_do_not_meet_are_not_compared_element_by_element(monkeypatch):
    """The check reads sizes, strides and addresses: disjoint gradients, views with gaps included,
    are cleared from their spans alone; element addresses are listed only where spans meet."""
    from fusedclip import _args

    b = torch.randn(64, 8)
    disjoint = [b[:16, ::2], b[16:32].t(), b[32:48, 1:3], torch.randn(5), b[48:]]

    def listed(t):
        raise AssertionError("element addresses listed for spans that do not meet")

    monkeypatch.setattr(_args, "_element_addresses", listed)
    _args.check_disjoint(disjoint)
    with pytest.raises(AssertionError, match="listed"):
        _args.check_disjoint([b[:16, ::2], b[:16, 1::2]])


def test_adaptive_clipping_parameters_may_share_memory(backend, device):
    """adaptive_clip_grad_ only reads the parameters: two that are views of one buffer (their rows
    overlap) are taken, on every backend, with the oracle's result."""
    buf = torch.randn(5, 3, dtype=torch.float64, device=device)
    first, second = torch.nn.Parameter(buf[:3]), torch.nn.Parameter(buf[1:])
    gen = torch.Generator().manual_seed(24)
    for p in (first, second):
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device) * 0.05
    before = [first.grad.clone(), second.grad.clone()]
    fusedclip.adaptive_clip_grad_([first, second], 0.01, 1e-3, backend=backend)
    for p, g0 in zip((first, second), before):
        ulp_close(p.grad, oracle_adaptive_clipped(g0, p.detach(), 0.01, 1e-3, 2.0))
    assert not torch.equal(first.grad, before[0])  # (something was clipped)


# ---- gradients that cannot be written in place, or taken by every function ----------------------

def _with(params, grad):
    p = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device))
    p.grad = grad
    return params + [p]


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_inference_tensor_gradient_is_refused_before_any_change(params, backend, device, name):
    """torch's in-place ops refuse an inference tensor outside inference mode; the reference used
    to write the gradients before it first, and Triton's kernels wrote it regardless."""
    with torch.inference_mode():
        grad = torch.randn(4, device=device)
    everything = _with(params, grad)
    if name == "get_total_norm":  # only read: taken
        WRITERS[name](everything, backend=backend)
        return
    expect_untouched(everything, ValueError,
                     r"^gradients\[4\] is an inference tensor \(made under "
                     r"torch.inference_mode\(\)\), which cannot be written in place outside "
                     r"inference mode; clone it first, or call inside inference mode$",
                     lambda: WRITERS[name](everything, backend=backend))


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_zero_tensor_gradient_is_refused_before_any_change(params, backend, device, name):
    everything = _with(params, torch._efficientzerotensor(4, device=device))
    if name == "get_total_norm":  # only read: its norm is that of zeros, on every backend
        ours = WRITERS[name](everything, backend=backend)
        theirs = fusedclip.get_total_norm(grads(params), backend=backend)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        return
    expect_untouched(everything, ValueError,
                     r"^gradients\[4\] is a ZeroTensor, which has no memory to write in place; "
                     r"give it its own storage \(\.clone\(\)\)$",
                     lambda: WRITERS[name](everything, backend=backend))


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_negative_view_gradients_as_their_values(backend, device, name):
    """A gradient with torch's negative bit (``_neg_view()``): the fused operators cannot take it
    as a mutable argument (the dispatcher's fallback raises), so it goes through a dense copy, as a
    view with gaps does; every backend gives the result of a plain gradient of the same values."""
    base = torch.randn(5, 3, device=device)
    views = [base._neg_view(), torch.randn(4, device=device)]
    plain = [v.resolve_neg().clone() for v in views]
    ours = WRITERS[name](_params_for(views), backend=backend)
    theirs = WRITERS[name](_params_for(plain), backend=backend)
    if isinstance(ours, torch.Tensor):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    assert views[0].is_neg()
    assert_bitwise_equal([v.resolve_neg() for v in views], plain)


@pytest.mark.parametrize("name", ["clip_grad_value_", "adaptive_clip_grad_"])
@pytest.mark.parametrize("kind", ["sparse", "complex"])
def test_value_and_adaptive_clipping_take_dense_real_gradients(params, backend, device, name,
                                                              kind):
    """Clamping has no order for complex values, and a sparse tensor no rows: refused on every
    backend, before anything is written (the reference used to clamp the gradients before a
    complex or sparse one, then fail in torch's clamp_; and to drop the imaginary parts in
    adaptive clipping)."""
    if kind == "sparse":
        grad = torch.randn(4, device=device).to_sparse()
        match = rf"^gradients\[4\] is a torch.sparse_coo tensor; {name} takes dense gradients only$"
    else:
        grad = torch.randn(4, dtype=torch.complex64, device=device)
        match = (rf"^gradients\[4\] has dtype torch.complex64; {name} takes real \(floating\) "
                 "gradients only$")
    everything = _with(params, grad)
    expect_untouched(everything, TypeError, match,
                     lambda: WRITERS[name](everything, backend=backend))


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_meta_gradient_beside_others(params, backend, name):
    """A meta tensor holds no values. The fused backends do not run it; the reference, which does,
    cannot join its norm with the others' (torch: "Cannot copy out of meta tensor"): both say so,
    naming the devices. What needs no norm (a given one, or value clipping) runs on the
    reference, as in torch."""
    everything = _with(params, torch.randn(4, device="meta"))
    call = lambda: WRITERS[name](everything, backend=backend)  # noqa: E731
    if backend != "reference":
        expect_untouched(everything[:4], RuntimeError,
                         rf"backend '{backend}' \(from backend=\) runs .* tensors here, but "
                         r"gradients\[4\] is on meta", call)
    elif name in ("clip_grads_with_norm_", "clip_grad_value_", "adaptive_clip_grad_"):
        call()
    else:
        expect_untouched(everything[:4], RuntimeError,
                         rf"^gradients\[4\] is on meta and gradients\[0\] on {params[0].device}: "
                         r"a meta tensor holds no values, so its norm cannot be combined with the "
                         r"others' \(with every gradient on meta, the norm is a meta tensor\)$",
                         call)



# ---- docs/errors.md: every bad input, its exact error, and a test per row ------------------------
# The page is the contract: each row's message (a "…" stands for what depends on the machine, such
# as a backend's reason) must be the whole message raised, and every gradient must keep its bits.
# A row of the page without a case here, or a case without a row, fails.

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _doc_rows() -> dict[str, tuple[str, str]]:
    """``{id: (error class name, message)}`` from the table of docs/errors.md."""
    rows = {}
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        ident, error, message = (c.strip("`").strip() for c in (cells[0], cells[2], cells[3]))
        rows[ident] = (error, message)
    return rows


def _doc_pattern(message: str) -> str:
    """The whole message, with each "…" standing for any text."""
    return "^" + ".*".join(re.escape(part) for part in message.split("…")) + "$"


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: ``call(params, backend)`` raises it. ``params`` are the ``params`` fixture's four
    float32 gradients, or ``make(device)``'s, then a parameter whose gradient is ``extra(device)``
    (gradients[4]); all are checked bit for bit afterwards, but a meta one (``extra_checked``).
    ``backends``: the ones the row is about (None: every one). ``setup(monkeypatch, backend)``
    runs first."""

    call: Callable[[list, str], object]
    extra: Callable[[torch.device], torch.Tensor] | None = None
    extra_checked: bool = True
    make: Callable[[torch.device], list] | None = None
    backends: tuple[str, ...] | None = None
    setup: Callable[[pytest.MonkeyPatch, str], None] | None = None


def _amp(params, backend, **kw):
    """clip_grad_norm_ with a GradScaler (that has scaled a loss) and an optimizer of ``params``;
    ``kw`` replaces either, or adds options."""
    scaler = torch.amp.GradScaler(params[0].device.type)
    scaler.scale(torch.ones((), device=params[0].device))
    options = {"scaler": scaler, "optimizer": torch.optim.SGD(params, lr=0.1), **kw}
    return fusedclip.clip_grad_norm_(params, 1.0, backend=backend, **options)


def _inference(device):
    with torch.inference_mode():
        return torch.randn(4, device=device)


def _env(name, value):
    return lambda monkeypatch, backend: monkeypatch.setenv(name, value)


def _env_and_off(monkeypatch, backend):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", backend)
    _switch_off(monkeypatch, backend, False, ())


FUSED = ("cpp", "triton")
CASES = {
    "parameters-type": Case(lambda ps, b: fusedclip.clip_grad_norm_(3.5, 1.0, backend=b)),
    "parameters-item": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps[:1] + ["w"], 1.0,
                                                                    backend=b)),
    "max-norm-negative": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, -1.0, backend=b)),
    "max-norm-nan": Case(lambda ps, b: fusedclip.clip_grads_with_norm_(ps, math.nan, 5.0,
                                                                       backend=b)),
    "max-norm-string": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, "1.0x", backend=b)),
    "max-norm-none": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, None, backend=b)),
    "max-norm-tensor": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, torch.ones(2),
                                                                    backend=b)),
    "max-norms-count": Case(lambda ps, b: fusedclip.clip_grad_norm_per_tensor_(
        ps, [1.0, 2.0], backend=b)),
    "max-norms-negative": Case(lambda ps, b: fusedclip.clip_grad_norm_per_tensor_(
        ps, [1.0, -1.0, 1.0, 1.0], backend=b)),
    "clip-value-negative": Case(lambda ps, b: fusedclip.clip_grad_value_(ps, -0.5, backend=b)),
    "norm-type-string": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, "fro", backend=b)),
    "norm-type-none": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, None, backend=b)),
    "norm-type-nan": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, math.nan,
                                                                  backend=b)),
    "norm-type-not-positive": Case(lambda ps, b: fusedclip.clip_grad_norm_per_tensor_(
        ps, 1.0, 0.0, backend=b)),
    "norm-type-general-with-option": Case(lambda ps, b: _amp(ps, b, norm_type=-1.0)),
    "negative-norm-of-empty": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, -1.0,
                                                                           backend=b),
                                   extra=lambda dev: torch.zeros(0, device=dev)),
    "mode": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, mode="medium", backend=b)),
    "return-stats": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, return_stats="all",
                                                                 backend=b)),
    "total-norm-shape": Case(lambda ps, b: fusedclip.clip_grads_with_norm_(
        ps, 1.0, torch.ones(2), backend=b)),
    "total-norm-dtype": Case(lambda ps, b: fusedclip.clip_grads_with_norm_(
        ps, 1.0, torch.tensor(True), backend=b)),
    "total-norm-string": Case(lambda ps, b: fusedclip.clip_grads_with_norm_(ps, 1.0, "big",
                                                                            backend=b)),
    "nonfinite-norm": Case(lambda ps, b: fusedclip.clip_grad_norm_(
        ps, 1.0, error_if_nonfinite=True, backend=b),
        extra=lambda dev: torch.tensor([math.inf], device=dev)),
    "integer-tensor": Case(lambda ps, b: fusedclip.get_total_norm(
        [ps[0].grad, torch.arange(3, device=ps[0].device)], backend=b)),
    "sparse-on-fused": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, backend=b),
                            extra=lambda dev: torch.ones(4, device=dev).to_sparse(),
                            backends=FUSED),
    "complex-on-fused": Case(lambda ps, b: fusedclip.get_total_norm(grads(ps), backend=b),
                             extra=lambda dev: torch.ones(4, dtype=torch.complex64, device=dev),
                             backends=FUSED),
    "sparse-value-or-adaptive": Case(lambda ps, b: fusedclip.clip_grad_value_(ps, 0.1,
                                                                              backend=b),
                                     extra=lambda dev: torch.ones(4, device=dev).to_sparse()),
    "complex-value-or-adaptive": Case(lambda ps, b: fusedclip.adaptive_clip_grad_(ps, backend=b),
                                      extra=lambda dev: torch.ones(4, dtype=torch.complex64,
                                                                   device=dev)),
    "device-not-run": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, backend=b),
                           extra=lambda dev: torch.ones(4, device="meta"), extra_checked=False,
                           backends=FUSED),
    "meta-beside-others": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, backend=b),
                               extra=lambda dev: torch.ones(4, device="meta"),
                               extra_checked=False, backends=("reference",)),
    "shared-memory": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps + ps[1:2], 1.0,
                                                                  backend=b)),
    "self-overlap": Case(lambda ps, b: fusedclip.clip_grad_value_(ps, 0.1, backend=b),
                         extra=lambda dev: torch.randn(1, 3, device=dev).expand(4, 3)),
    "inference-tensor": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, backend=b),
                             extra=_inference),
    "zero-tensor": Case(lambda ps, b: fusedclip.clip_grads_with_norm_(ps, 1.0, 5.0, backend=b),
                        extra=lambda dev: torch._efficientzerotensor(4, device=dev)),
    "backend-unknown": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, backend="turbo")),
    "backend-type": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, backend=1)),
    "backend-cannot-run": Case(lambda ps, b: fusedclip.clip_grad_norm_(ps, 1.0, backend=b),
                               setup=lambda mp, b: _switch_off(mp, b, False, ())),
    "env-backend-unknown": Case(lambda ps, b: fusedclip.clip_grad_value_(ps, 0.1),
                                setup=_env("FUSEDCLIP_BACKEND", "turbo")),
    "env-backend-cannot-run": Case(lambda ps, b: fusedclip.clip_grad_value_(ps, 0.1),
                                   setup=_env_and_off),
    "select-backend-nothing": Case(lambda ps, b: fusedclip.select_backend([])),
    "amp-scaler-type": Case(lambda ps, b: _amp(ps, b, scaler="yes")),
    "amp-optimizer-missing": Case(lambda ps, b: _amp(ps, b, optimizer=None)),
    "amp-optimizer-alone": Case(lambda ps, b: _amp(ps, b, scaler=None)),
    "amp-return-stats": Case(lambda ps, b: _amp(ps, b, return_stats=True)),
    "amp-fp16": Case(lambda ps, b: _amp(ps, b),
                     make=lambda dev: make_params(SHAPE_CLASSES["several"], torch.float16,
                                                  device=dev, seed=21)),
    "amp-not-owned": Case(lambda ps, b: _amp(ps, b, optimizer=torch.optim.SGD(ps[:2], lr=0.1))),
    "fold-not-fused": Case(lambda ps, b: _amp(ps, b, scaler=None, fold_into_optimizer=True)),
    "process-group-options": Case(lambda ps, b: fusedclip.clip_grad_norm_(
        ps, 1.0, return_stats=True, process_group=object(), backend=b)),
}


def test_every_row_of_the_errors_page_has_a_case():
    # cpu-capability below; cuda-pass1-variant in tests/engine/test_build.py
    assert sorted(_doc_rows()) == sorted([*CASES, "cpu-capability", "cuda-pass1-variant"])


@pytest.mark.parametrize("ident", sorted(CASES))
def test_errors_page_row(params, backend, device, monkeypatch, ident):
    case = CASES[ident]
    if case.backends is not None and backend not in case.backends:
        pytest.skip(f"{ident}: a row about backend {' or '.join(case.backends)}")
    error, message = _doc_rows()[ident]
    base = case.make(params[0].device) if case.make else params
    called = _with(base, case.extra(params[0].device)) if case.extra else base
    if case.setup:
        case.setup(monkeypatch, backend)
    checked = called if case.extra_checked else base
    expect_untouched(checked, getattr(builtins, error), _doc_pattern(message),
                     lambda: case.call(called, backend))


def test_errors_page_cpu_capability_row():
    """FUSEDCLIP_CPU_CAPABILITY is read once, by the first CPU pass: a process of its own."""
    if not fusedclip.available_backends()["cpp"].available:
        pytest.skip("fusedclip._C is not built")
    error, message = _doc_rows()["cpu-capability"]
    script = (
        "import torch, fusedclip\n"
        "p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.ones(3)\n"
        "try:\n"
        "    fusedclip.clip_grad_norm_([p], 0.5, backend='cpp')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__); print(str(exc).splitlines()[0])\n"
        "print(p.grad.tolist())\n"
    )
    # The fusedclip under test (the source tree's, or an installed copy: make test-cpu-torch),
    # not whatever the repository root would put first on the path.
    home = os.path.dirname(os.path.dirname(os.path.abspath(fusedclip.__file__)))
    env = {**os.environ, "FUSEDCLIP_CPU_CAPABILITY": "sse9",
           "PYTHONPATH": os.pathsep.join([home, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, cwd=home).stdout.splitlines()
    assert out[0] == error
    assert re.match(_doc_pattern(message), out[1]), out[1]
    assert out[2] == "[1.0, 1.0, 1.0]"
