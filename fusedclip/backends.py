"""Backend registry and selection: ``cuda`` (fusedclip._C), ``triton`` and ``reference``.

Selection order for ``backend=None`` / ``"auto"``: ``cuda`` when it can run and the gradients are
on a CUDA device, else ``triton`` when it can run there, else ``reference``. ``backend=`` or the
``FUSEDCLIP_BACKEND`` environment variable names one explicitly; a named backend that cannot run
is an error, never a silent fallback.

A backend is any object with the functions of ``fusedclip.reference``: ``total_norm``,
``clip_``, ``clip_with_norm_`` and ``clamp_``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor

from fusedclip import _extension, reference

ENV_VAR = "FUSEDCLIP_BACKEND"
BACKEND_NAMES = ("cuda", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on this machine, and why or why not."""

    available: bool
    reason: str

    def __repr__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.reason}"


def _cuda_status() -> BackendStatus:
    if not _extension.loaded():
        return BackendStatus(False, f"fusedclip._C is not built ({_extension.LOAD_ERROR})")
    ops = ", ".join(_extension.op_names())
    built = f"fusedclip._C is built (ops: {ops}, CUDA {torch.version.cuda})"
    # The fused norm-and-clip engine (pass 1 and its plan) is the next piece of csrc/; until it is
    # there only the rescale op exists and the backend is not offered.
    return BackendStatus(False, f"{built}, but the fused norm kernel is not implemented yet")


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed")
    import triton

    return BackendStatus(
        False,
        f"triton {triton.__version__} is installed, but no Triton kernels are implemented yet",
    )


_STATUS = {
    "cuda": _cuda_status,
    "triton": _triton_status,
    "reference": lambda: BackendStatus(
        True, "pure PyTorch, fp64 accumulation; any device, sparse and complex gradients"
    ),
}

_IMPLEMENTATION: dict[str, ModuleType] = {"reference": reference}


@functools.cache
def backend_status(name: str) -> BackendStatus:
    return _STATUS[name]()


def available_backends() -> dict[str, BackendStatus]:
    """Each backend, whether it can run on this machine, and why (not).

    >>> fusedclip.available_backends()["reference"].available
    True
    """
    return {name: backend_status(name) for name in BACKEND_NAMES}


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if backend_status(name).available:
                return name
    return "reference"


def check_name(requested: str | None) -> tuple[str, str]:
    """The normalized backend name (``"auto"`` or one of BACKEND_NAMES) and where it came from."""
    source = "backend="
    if requested is None:
        requested, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string or None, got {type(requested).__name__}")
    name = requested.strip().lower()
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {requested!r} (from {source}); "
            f"choose one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}"
        )
    return name, source


def select(requested: str | None, tensors: list[Tensor]) -> ModuleType:
    """The backend implementation for ``tensors`` (non-empty), or a clear error."""
    name, source = check_name(requested)
    if name == "auto":
        name = _auto(tensors[0].device)
    status = backend_status(name)
    if not status.available:
        raise RuntimeError(f"backend {name!r} (from {source}) cannot run here: {status.reason}")
    return _IMPLEMENTATION[name]
