"""Backend selection: what runs where, overrides, and what available_backends() says."""

from __future__ import annotations

import pytest
import torch
from conftest import grads, make_params

import fusedclip
from fusedclip import backends, reference


def test_available_backends_reports_every_backend_with_a_reason():
    status = fusedclip.available_backends()
    assert list(status) == ["cuda", "triton", "reference"]
    for name, s in status.items():
        assert isinstance(s, fusedclip.BackendStatus) and isinstance(s.available, bool)
        assert s.reason, f"{name} gives no reason"
        assert repr(s).startswith("available" if s.available else "unavailable")
    assert status["reference"].available


def test_cpu_tensors_take_the_reference_backend():
    tensors = grads(make_params([(3,)]))
    assert backends.select(None, tensors) is reference
    assert backends.select("auto", tensors) is reference
    assert backends.select(" Reference ", tensors) is reference


@pytest.mark.parametrize("value", ["reference", "auto", ""])
def test_environment_override(value, monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", value)
    assert backends.select(None, grads(make_params([(3,)]))) is reference


def test_keyword_beats_environment(monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "turbo")
    assert backends.select("reference", grads(make_params([(3,)]))) is reference


@pytest.mark.gpu
def test_cuda_tensors_prefer_fused_backends():
    tensors = [torch.randn(10, device="cuda")]
    status = fusedclip.available_backends()
    expected = next((n for n in ("cuda", "triton") if status[n].available), "reference")
    assert backends.select(None, tensors) is backends._IMPLEMENTATION[expected]


@pytest.mark.gpu
def test_reference_backend_runs_on_cuda_tensors():
    params = make_params([(1000, 3), (7,), (0,)], torch.bfloat16, device="cuda", seed=30)
    cpu_twin = make_params([(1000, 3), (7,), (0,)], torch.bfloat16, seed=30)
    norm = fusedclip.clip_grad_norm_(params, 0.5, backend="reference")
    cpu_norm = fusedclip.clip_grad_norm_(cpu_twin, 0.5, backend="reference")
    assert norm.device.type == "cuda"
    torch.testing.assert_close(norm.cpu(), cpu_norm, rtol=0, atol=0)
    for g, c in zip(grads(params), grads(cpu_twin)):
        torch.testing.assert_close(g.cpu(), c, rtol=0, atol=0)


def _fake_cuda_tensors(*make):
    """CUDA tensors as FakeTensors: a device and dtype without a GPU (all selection reads)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return [m() for m in make]


@pytest.mark.parametrize(
    "cuda_ok, triton_ok, expected",
    [(True, True, "cuda"), (False, True, "triton"), (False, False, "reference")],
)
def test_auto_prefers_cuda_then_triton_for_cuda_tensors(monkeypatch, cuda_ok, triton_ok, expected):
    # Triton is the automatic choice when fusedclip._C is not built (or cannot run). As on a GPU
    # machine: Triton compiles for CUDA tensors (here it may be in interpreter mode, CPU only).
    monkeypatch.setitem(backends._RUNS_ON, "triton", ("cuda",))
    for name, ok in (("cuda", cuda_ok), ("triton", triton_ok)):
        monkeypatch.setitem(backends._STATUS, name,
                            lambda ok=ok: backends.BackendStatus(ok, "test"))
    backends.backend_status.cache_clear()
    try:
        dense = _fake_cuda_tensors(lambda: torch.empty(4, device="cuda"))
        assert backends.select(None, dense) is backends._IMPLEMENTATION[expected]
        # Complex gradients are the reference's, whatever else can run.
        cplx = _fake_cuda_tensors(lambda: torch.empty(4, dtype=torch.complex64, device="cuda"))
        assert backends.select(None, cplx) is reference
    finally:
        backends.backend_status.cache_clear()
