"""The (backend x device) pairs the tests run, and why a pair cannot run here."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fusedclip.backends import triton as triton_backend
from fusedclip.backends.cpp import _lib

BACKENDS = ("cpp", "triton", "reference")
ENGINES = ("cpp", "triton")  # the backends made of operators (tests/engine/test_ops.py)
DEVICES = ("cpu", "cuda")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def why_not(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run ``device`` tensors here (None: it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    if backend == "cpp":
        if not _lib.loaded():
            return f"fusedclip._C is not built ({_lib.LOAD_ERROR})"
        if device == "cuda" and not _lib.cuda_kernels():
            return "fusedclip._C was built without its CUDA kernels"
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device == "cpu" and not triton_backend.interpreting():
            return ("Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), which "
                    "is off where a GPU runs the kernels")
        if device == "cuda" and triton_backend.interpreting():
            return "TRITON_INTERPRET=1: Triton runs CPU tensors only"
    return None


def target_params(backends=BACKENDS, devices=DEVICES) -> list:
    """``pytest.param((backend, device))`` for every pair, marked ``gpu`` on CUDA and skipped,
    with the reason, where it cannot run."""
    params = []
    for device in devices:
        for backend in backends:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            reason = why_not(backend, device)
            if reason:
                marks.append(pytest.mark.skip(reason=f"{backend} on {device}: {reason}"))
            params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


