"""Verification on first use (``fusedclip.verify``): where a backend has never run on a kind of
device, its first call there per dtype checks it against an fp64 computation, and a backend that
fails is disabled with a loud warning while the call is answered by the next one.

On the CPU the pairs are tested on every submission, so these tests force verification on with
``FUSEDCLIP_VERIFY=1`` and inject a broken kernel into the C++ engine's operators.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from gradients import clone_params, make_params
from oracle import oracle_coef, oracle_norm

import fusedclip
from fusedclip import verify
from fusedclip.backends import cpp

pytestmark = pytest.mark.skipif(not fusedclip.available_backends()["cpp"].runs_on("cpu"),
                                reason="needs fusedclip._C")

SHAPES = [(33, 17), (70001,), (5,), (1,), (0,)]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    verify.reset()
    yield monkeypatch
    verify.reset()


def _count_checks(monkeypatch):
    calls = []
    real = verify._compare

    def counted(backend, dtype, device):
        calls.append((dtype, device.type))
        return real(backend, dtype, device)

    monkeypatch.setattr(verify, "_compare", counted)
    return calls


def _broken(monkeypatch):
    """The engine's two-pass clip scaling by a wrong factor (what an untested kernel might do)."""
    ops = cpp.BACKEND.ops

    def clip(tensors, max_norm, norm_type, per_tensor, inv_scale=None, found_inf=None,
             soft=False):
        norm, per = ops.clip(tensors, max_norm, norm_type, per_tensor, inv_scale, found_inf, soft)
        for t in tensors:
            t.mul_(1.01)
        return norm, per

    monkeypatch.setattr(cpp.BACKEND, "ops", dataclasses.replace(ops, clip=clip))


def test_pairs_the_suite_runs_are_not_verified_by_default(monkeypatch):
    monkeypatch.delenv(verify.ENV_VAR, raising=False)
    assert not verify.needed("cpp", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert verify.needed("cpp", torch.device("cuda", 0))
    assert verify.needed("triton", torch.device("cuda", 0))
    assert not verify.needed("reference", torch.device("cuda", 0))
    monkeypatch.undo()
    monkeypatch.delenv(verify.ENV_VAR, raising=False)
    calls = _count_checks(monkeypatch)
    params = make_params(SHAPES, seed=1)
    fusedclip.clip_grad_norm_(params, 0.5)
    assert calls == []


def test_once_per_dtype_and_device(monkeypatch):
    monkeypatch.setenv(verify.ENV_VAR, "1")
    calls = _count_checks(monkeypatch)
    for _ in range(3):
        for dtype in (torch.float32, torch.bfloat16):
            params = make_params(SHAPES, dtype=dtype, seed=2)
            fusedclip.get_total_norm([p.grad for p in params], backend="cpp")
    assert sorted(calls, key=str) == sorted([(torch.float32, "cpu"), (torch.bfloat16, "cpu")],
                                            key=str)
    # The one-call path checks every kernel dtype at once, the first time it is taken.
    fusedclip.clip_grad_norm_(make_params(SHAPES, seed=3), 0.5)
    assert {dtype for dtype, _ in calls} == set(verify.DTYPES)


@pytest.mark.parametrize("call", ["clip_grad_norm_", "get_total_norm"])
def test_a_broken_kernel_is_disabled_loudly_and_the_answer_is_right(monkeypatch, call):
    monkeypatch.setenv(verify.ENV_VAR, "1")
    _broken(monkeypatch)
    params = make_params(SHAPES, seed=4)
    twin = clone_params(params)
    expected = oracle_norm([p.grad for p in twin], 2.0)
    with pytest.warns(RuntimeWarning, match="backend 'cpp' failed its verification on cpu and "
                      "is disabled for this process: clipped torch.float32 tensor 0"):
        if call == "clip_grad_norm_":
            norm = fusedclip.clip_grad_norm_(params, 0.5)
        else:
            norm = fusedclip.get_total_norm([p.grad for p in params])
    assert math.isclose(float(norm), expected, rel_tol=1e-6)
    assert "clipped torch.float32 tensor 0" in verify.disabled("cpp", torch.device("cpu"))
    if call == "clip_grad_norm_":  # answered by the reference: the oracle's clip
        coef = oracle_coef(0.5, expected)
        for p, q in zip(params, twin):
            torch.testing.assert_close(p.grad, (q.grad.double() * coef).float(), rtol=2e-7,
                                       atol=0)
    with warnings_as_errors():  # said once: the next calls go straight to the next backend
        fusedclip.clip_grad_norm_(make_params(SHAPES, seed=5), 0.5)
        assert fusedclip.select_backend([params[0].grad]) == "reference"  # what runs now


class warnings_as_errors:  # noqa: N801 - reads as a context manager
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def test_off_means_off(monkeypatch):
    """FUSEDCLIP_VERIFY=0: nothing is checked (even a broken kernel answers: this is what the
    switch is for, where the check itself is not wanted)."""
    monkeypatch.setenv(verify.ENV_VAR, "0")
    calls = _count_checks(monkeypatch)
    _broken(monkeypatch)
    assert not verify.needed("cpp", torch.device("cuda", 0))
    params = make_params(SHAPES, seed=6)
    fusedclip.clip_grad_norm_(params, 0.5, backend="cpp")
    assert calls == []


def test_a_bad_setting_is_an_error(monkeypatch):
    monkeypatch.setenv(verify.ENV_VAR, "yes")
    with pytest.raises(ValueError, match="FUSEDCLIP_VERIFY must be 0, 1 or unset, got 'yes'"):
        fusedclip.clip_grad_norm_(make_params(SHAPES, seed=7), 0.5)


def test_inside_a_graph_capture_it_says_to_call_once_before(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(verify.VerificationError, match="call the clip once before capturing"):
        verify.check("cpp", cpp.BACKEND, torch.device("cuda", 0), torch.float32)
