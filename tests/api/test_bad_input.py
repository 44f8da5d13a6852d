"""Bad input: a clear error naming the problem, and not one gradient changed.

Every call that reaches a backend runs for every backend on every device (conftest's ``backend``
x ``device`` matrix; a pair that cannot run here is a visible skip): the checks must come before
anything is touched on every path, the one-call fast paths of the compiled backends included.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradients import SHAPE_CLASSES, grads, make_params
from oracle import assert_bitwise_equal

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


def expect_untouched(params, error, match, call):
    before = [g.clone() for g in grads(params)]
    with pytest.raises(error, match=match):
        call()
    assert_bitwise_equal(grads(params), before)


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
