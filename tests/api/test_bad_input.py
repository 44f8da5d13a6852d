"""Bad input: a clear error naming the problem, and not one gradient changed."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHAPE_CLASSES, assert_bitwise_equal, grads, make_params

import fusedclip

CALLS = {
    "clip_grad_norm_": lambda params, **kw: fusedclip.clip_grad_norm_(params, 1.0, **kw),
    "clip_grads_with_norm_": lambda params, **kw: fusedclip.clip_grads_with_norm_(
        params, 1.0, torch.tensor(100.0), **kw),
    "clip_grad_value_": lambda params, **kw: fusedclip.clip_grad_value_(params, 0.1, **kw),
}


@pytest.fixture
def params():
    return make_params(SHAPE_CLASSES["several"], torch.float32, seed=21)


def expect_untouched(params, error, match, call):
    before = [g.clone() for g in grads(params)]
    with pytest.raises(error, match=match):
        call()
    assert_bitwise_equal(grads(params), before)


@pytest.mark.parametrize("max_norm", [-1.0, -1e-30, math.nan, -math.inf])
def test_bad_max_norm(params, max_norm):
    expect_untouched(params, ValueError, "max_norm must be a non-negative number",
                     lambda: fusedclip.clip_grad_norm_(params, max_norm))
    expect_untouched(params, ValueError, "max_norm must be a non-negative number",
                     lambda: fusedclip.clip_grads_with_norm_(params, max_norm, torch.tensor(9.0)))


@pytest.mark.parametrize(
    "max_norm, error", [("1.0x", ValueError), (None, TypeError), (torch.ones(2), TypeError)]
)
def test_max_norm_not_a_number(params, max_norm, error):
    # float()'s own error class, as torch (which calls float()) raises.
    expect_untouched(params, error, "max_norm must be a number",
                     lambda: fusedclip.clip_grad_norm_(params, max_norm))


def test_max_norm_edge_values_are_accepted(params):
    twin = make_params(SHAPE_CLASSES["several"], torch.float32, seed=21)
    fusedclip.clip_grad_norm_(params, math.inf)
    assert_bitwise_equal(grads(params), grads(twin))
    fusedclip.clip_grad_norm_(params, torch.tensor(0.0))
    assert all(not g.any() for g in grads(params))


@pytest.mark.parametrize("norm_type", [0, 0.0, -1.0, -math.inf, math.nan, "-inf"])
def test_unsupported_norm_type(params, norm_type):
    expect_untouched(params, ValueError, "norm_type must be a positive number or inf",
                     lambda: fusedclip.clip_grad_norm_(params, 1.0, norm_type))
    expect_untouched(params, ValueError, "norm_type must be a positive number or inf",
                     lambda: fusedclip.get_total_norm(grads(params), norm_type))


@pytest.mark.parametrize("norm_type, error", [("fro", ValueError), ("nuc", ValueError),
                                              (None, TypeError)])
def test_norm_type_not_a_number(params, norm_type, error):
    expect_untouched(params, error, "norm_type must be a number",
                     lambda: fusedclip.clip_grad_norm_(params, 1.0, norm_type))
    with pytest.raises(error):
        torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type)


def test_string_inf_norm_type_is_accepted_as_in_torch(params):
    ours = fusedclip.clip_grad_norm_(params, 1e9, "inf")
    assert float(ours) == max(float(g.abs().max()) for g in grads(params))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_non_tensor_in_parameters(params, name):
    mixed = params[:2] + ["not a tensor"] + params[2:]
    expect_untouched(params, TypeError, r"parameters\[2\] is a str, expected a torch.Tensor",
                     lambda: CALLS[name](mixed))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_parameters_not_iterable(name):
    with pytest.raises(TypeError, match="parameters must be a Tensor or an iterable of Tensors"):
        CALLS[name](3.5)


def test_non_tensor_in_get_total_norm(params):
    with pytest.raises(TypeError, match=r"tensors\[1\] is a float"):
        fusedclip.get_total_norm([grads(params)[0], 1.0])


@pytest.mark.parametrize("clip_value", [-0.5, math.nan])
def test_bad_clip_value(params, clip_value):
    expect_untouched(params, ValueError, "clip_value must be a non-negative number",
                     lambda: fusedclip.clip_grad_value_(params, clip_value))


@pytest.mark.parametrize(
    "total_norm, error, match",
    [
        (torch.ones(2), ValueError, "total_norm must hold one value"),
        (torch.tensor(True), TypeError, "total_norm must be a real tensor"),
        (torch.tensor(1 + 1j), TypeError, "total_norm must be a real tensor"),
        ("big", ValueError, "total_norm must be a number"),
    ],
)
def test_bad_total_norm(params, total_norm, error, match):
    expect_untouched(params, error, match,
                     lambda: fusedclip.clip_grads_with_norm_(params, 1.0, total_norm))


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("backend", ["cudnn", "", "fast"])
def test_unknown_backend(params, name, backend):
    expect_untouched(params, ValueError, "unknown backend .* choose one of 'auto', 'cuda'",
                     lambda: CALLS[name](params, backend=backend))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_backend_of_wrong_type(params, name):
    expect_untouched(params, TypeError, "backend must be a string",
                     lambda: CALLS[name](params, backend=1))


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_backend_is_an_error_not_a_fallback(params, name, backend):
    status = fusedclip.available_backends()[backend]
    if status.available:
        pytest.skip(f"{backend} can run here")
    expect_untouched(params, RuntimeError, f"backend '{backend}' .*cannot run here: .+",
                     lambda: CALLS[name](params, backend=backend))


def test_unknown_backend_from_environment(params, monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "turbo")
    expect_untouched(params, ValueError, "unknown backend 'turbo' \\(from FUSEDCLIP_BACKEND\\)",
                     lambda: fusedclip.clip_grad_norm_(params, 1.0))


def test_integer_total_norm_is_accepted_as_in_torch(params):
    twin = make_params(SHAPE_CLASSES["several"], torch.float32, seed=21)
    fusedclip.clip_grads_with_norm_(params, 1.0, torch.tensor(50))
    torch.nn.utils.clip_grads_with_norm_(twin, 1.0, torch.tensor(50))
    for g, t in zip(grads(params), grads(twin)):
        torch.testing.assert_close(g, t)


def test_integer_tensors_have_no_norm():
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
        fusedclip.get_total_norm([torch.randn(3), torch.arange(5)])


@pytest.mark.parametrize("name", sorted(CALLS))
def test_self_overlapping_grad_is_refused_before_any_change(params, name):
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.randn(1, 3).expand(4, 3)
    expect_untouched(params + [p], ValueError, r"gradients\[4\] has elements that share memory",
                     lambda: CALLS[name](params + [p]))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_unknown_backend_is_reported_without_grads(name):
    no_grad = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="unknown backend"):
        CALLS[name](no_grad, backend="turbo")
    with pytest.raises(ValueError, match="unknown backend"):
        fusedclip.get_total_norm([], backend="turbo")
