"""Backend registry and selection: ``cuda`` (fusedclip._C), ``triton`` and ``reference``.

Selection order for ``backend=None`` / ``"auto"``: ``cuda`` when it can run and the gradients are
dense real floating tensors on a CUDA device, else ``triton`` when it can run there, else
``reference`` (which also takes sparse and complex gradients). ``backend=`` or the
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
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from fusedclip import _extension, fused, reference, triton_backend

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
    ops = ", ".join(n for n in _extension.op_names() if not n.startswith("triton_"))
    built = f"fusedclip._C is built (ops: {ops}; CUDA {torch.version.cuda})"
    if not torch.cuda.is_available():
        return BackendStatus(False, f"{built}, but no CUDA device is visible")
    return BackendStatus(True, f"{built}; {torch.cuda.get_device_name()}")


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed")
    from importlib.metadata import version

    installed = f"triton {version('triton')}"
    if triton_backend.interpreting():
        return BackendStatus(
            True, f"{installed}, TRITON_INTERPRET=1: kernels run on CPU tensors in the interpreter"
        )
    if torch.cuda.is_available():
        return BackendStatus(True, f"{installed}; {torch.cuda.get_device_name()}")
    return BackendStatus(
        False,
        f"{installed} is installed, but no CUDA device is visible (TRITON_INTERPRET=1 runs the "
        "kernels on CPU tensors in Triton's interpreter)",
    )


_STATUS = {
    "cuda": _cuda_status,
    "triton": _triton_status,
    "reference": lambda: BackendStatus(
        True, "pure PyTorch, fp64 accumulation; any device, sparse and complex gradients"
    ),
}

_IMPLEMENTATION: dict[str, ModuleType] = {
    "cuda": fused,
    "triton": triton_backend,
    "reference": reference,
}

# The devices each backend runs tensors on (None: any device).
_RUNS_ON = {
    "cuda": ("cuda",),
    # In Triton's interpreter the kernels read host memory: CPU tensors only.
    "triton": ("cpu",) if triton_backend.interpreting() else ("cuda",),
    "reference": None,
}


_STATUS_SEEN: dict[str, BackendStatus] = {}


def backend_status(name: str) -> BackendStatus:
    """Whether backend ``name`` can run here, found once per process. A plain dict rather than
    ``functools.cache``: under ``torch.compile`` Dynamo reads it (with a guard) instead of tracing
    through a cache wrapper."""
    status = _STATUS_SEEN.get(name)
    if status is None:
        status = _STATUS_SEEN[name] = _STATUS[name]()
    return status


backend_status.cache_clear = _STATUS_SEEN.clear  # what tests call after changing _STATUS


def available_backends() -> dict[str, BackendStatus]:
    """Each backend, whether it can run on this machine, and why (not).

    >>> fusedclip.available_backends()["reference"].available
    True
    """
    return {name: backend_status(name) for name in BACKEND_NAMES}


def _fused_can_take(tensors: list[Tensor]) -> bool:
    return all(t.layout == torch.strided and t.dtype in fused.KERNEL_DTYPES for t in tensors)


def _auto(tensors: list[Tensor]) -> str:
    """``cuda``, then ``triton``, for CUDA tensors they can take; otherwise ``reference``."""
    if tensors[0].device.type == "cuda" and _fused_can_take(tensors):
        for name in ("cuda", "triton"):
            if backend_status(name).available and _runs_on(name, "cuda"):
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
        name = _auto(tensors)
    status = backend_status(name)
    if not status.available:
        raise RuntimeError(f"backend {name!r} (from {source}) cannot run here: {status.reason}")
    runs_on = _RUNS_ON[name]
    if runs_on is not None:
        for i, t in enumerate(tensors):
            if t.device.type not in runs_on:
                raise RuntimeError(
                    f"backend {name!r} (from {source}) runs on {' and '.join(runs_on)} tensors, "
                    f"but gradients[{i}] is on {t.device}"
                )
        fused.check_tensors(tensors, name)
    return _IMPLEMENTATION[name]


def _runs_on(name: str, device_type: str) -> bool:
    """Whether backend ``name`` takes tensors on ``device_type``."""
    devices = _RUNS_ON[name]
    return devices is None or device_type in devices


def cuda_tensors_only(name: str) -> bool:
    """Whether backend ``name`` runs CUDA tensors only."""
    return _RUNS_ON[name] == ("cuda",)


def fast_impl(requested: str | None) -> tuple[ModuleType, bool] | None:
    """The module with the one-call paths (``clip_params``, ``norm_params``) of the backend
    ``requested`` names or ``auto`` picks on CUDA, and whether it takes CUDA gradients only; None
    when there is none. Both need ``fusedclip._C`` (its C++ plan)."""
    name, _ = check_name(requested)
    if not _extension.loaded():
        return None
    if name == "auto":
        # Only CUDA gradients may skip auto-selection: anything else goes to `reference`.
        for candidate in ("cuda", "triton"):
            if backend_status(candidate).available and _runs_on(candidate, "cuda"):
                return _IMPLEMENTATION[candidate], True
        return None
    if name in ("cuda", "triton") and backend_status(name).available:
        return _IMPLEMENTATION[name], cuda_tensors_only(name)
    return None


def fast_path(requested: str | None) -> Callable[..., Tensor | None] | None:
    """The one-call ``clip_grad_norm_`` path (``fast_impl``): ``f(params, max_norm, norm_type)``
    returns the norm, or None when the gradients need the general path."""
    impl = fast_impl(requested)
    if impl is None:
        return None
    module, cuda_only = impl
    return functools.partial(module.clip_params, cuda_only=cuda_only)
