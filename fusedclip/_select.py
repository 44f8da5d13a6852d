"""Which backend runs a call: the registry, what each can run here, and the choice.

``backend=None`` or ``"auto"`` (unless ``FUSEDCLIP_BACKEND`` names one) picks, for the devices the
gradients are on, the first of ``cpp``, ``triton``, ``reference`` that runs all of them and takes
the gradients as they are: ``cpp`` and ``triton`` take dense (strided) real floating tensors,
``reference`` anything. Triton's CPU interpreter is never picked (it is how tests run the Triton
kernels without a GPU, thousands of times slower than the others). ``backend=`` or
``FUSEDCLIP_BACKEND`` naming a backend that cannot run the gradients is an error, never a silent
fallback.

``"cuda"`` is the old name of ``cpp`` from before the engine's CPU kernels were offered: accepted
with a ``FutureWarning`` and, as then, for CUDA tensors only.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from torch import Tensor

from fusedclip import verify
from fusedclip.backends import Backend, BackendStatus, cpp, reference, triton
from fusedclip.backends._multi_tensor import KERNEL_DTYPES, kernels_take

__all__ = ["BACKEND_NAMES", "ENV_VAR", "Choice", "auto_name", "available_backends",
           "backend_status", "fast_path", "get", "parse", "select", "select_backend"]

ENV_VAR = "FUSEDCLIP_BACKEND"
BACKEND_NAMES = ("cpp", "triton", "reference")  # also auto's order of preference
_BACKENDS: dict[str, Backend] = {
    "cpp": cpp.BACKEND,
    "triton": triton.BACKEND,
    "reference": reference,
}
# Old name -> (new name, the device types the old name ran).
_RENAMED = {"cuda": ("cpp", ("cuda",))}


@dataclasses.dataclass(frozen=True)
class Choice:
    """A validated ``backend=`` request: ``"auto"`` or a backend name, where it came from, and
    the device types an old name restricts it to (None: the backend's own)."""

    name: str
    source: str
    only: tuple[str, ...] | None = None


def get(name: str) -> Backend:
    """The backend called ``name`` (one of ``BACKEND_NAMES``)."""
    return _BACKENDS[name]


def backend_status(name: str) -> BackendStatus:
    """Whether backend ``name`` can run here, and on which devices (found once per process)."""
    return _BACKENDS[name].status()


def available_backends() -> dict[str, BackendStatus]:
    """Each backend, whether it can run on this machine, on which device types, and why (not).

    >>> fusedclip.available_backends()["reference"].available
    True
    """
    return {name: backend_status(name) for name in BACKEND_NAMES}


def parse(requested: str | None) -> Choice:
    """``backend=`` (or, for None, ``FUSEDCLIP_BACKEND``) checked and normalized, once per call."""
    source = "backend="
    if requested is None:
        requested, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string or None, got {type(requested).__name__}")
    name = requested.strip().lower()
    if name in _RENAMED:
        new, only = _RENAMED[name]
        warnings.warn(f"backend {name!r} is now called {new!r} (the compiled engine also runs "
                      f"CPU tensors); {name!r} keeps meaning {new!r} on "
                      f"{' and '.join(only)} tensors", FutureWarning, stacklevel=3)
        return Choice(new, source, only)
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {requested!r} (from {source}); "
            f"choose one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}"
        )
    return Choice(name, source)


def auto_name(device_types: set[str] | frozenset[str], kernels_take_them: bool = True) -> str:
    """The backend auto picks for gradients on these device types; ``kernels_take_them``: they are
    dense tensors of the kernel dtypes."""
    for name in BACKEND_NAMES:
        if name != "reference" and not kernels_take_them:
            continue
        if name == "triton" and "cpu" in device_types:
            continue  # the interpreter: for tests only
        status = backend_status(name)
        if all(status.runs_on(d) for d in device_types):
            return name
    return "reference"


def _name_for(choice: Choice, tensors: list[Tensor]) -> str:
    if choice.name != "auto":
        return choice.name
    return auto_name({t.device.type for t in tensors}, kernels_take(tensors))


def _verified(name: str, tensors: list[Tensor], run: bool = True) -> bool:
    """``fusedclip.verify``: backend ``name`` verified (now, if needed and ``run``; else: not
    known to have failed) on every device and dtype among ``tensors``."""
    seen = set()
    for t in tensors:
        key = (t.device, t.dtype)
        if key in seen or t.dtype not in KERNEL_DTYPES:
            continue
        seen.add(key)
        if not verify.needed(name, t.device):
            continue
        if run and not verify.check(name, _BACKENDS[name], t.device, t.dtype):
            return False
        if not run and verify.disabled(name, t.device):
            return False
    return True


def _next_verified(name: str, tensors: list[Tensor], run: bool = True) -> Backend:
    """The backend after ``name`` (in auto's order) that runs ``tensors`` and verifies on them:
    where a verification failed, the call still gets an answer, from the reference at the end."""
    device_types = {t.device.type for t in tensors}
    for later in BACKEND_NAMES[BACKEND_NAMES.index(name) + 1:]:
        if later != "reference" and not kernels_take(tensors):
            continue
        if later == "triton" and "cpu" in device_types:
            continue  # the interpreter, for tests only
        status = backend_status(later)
        if all(status.runs_on(d) for d in device_types) and _verified(later, tensors, run):
            return _BACKENDS[later]
    return _BACKENDS["reference"]


def select(choice: Choice, tensors: list[Tensor], verify_now: bool = True) -> Backend:
    """The backend for ``tensors`` (non-empty), or a clear error before anything is touched.
    ``verify_now``: run the first-use verification it needs (``fusedclip.verify``); without it,
    only a failed one counts."""
    name = _name_for(choice, tensors)
    status = backend_status(name)
    label = f"backend {name!r} (from {choice.source})"
    if not status.available:
        raise RuntimeError(f"{label} cannot run here: {status.reason}")
    for i, t in enumerate(tensors):
        device_type = t.device.type
        if not status.runs_on(device_type) or (choice.only and device_type not in choice.only):
            runs = choice.only or status.devices
            raise RuntimeError(f"{label} runs {' and '.join(runs)} tensors here, but "
                               f"gradients[{i}] is on {t.device} ({status.reason})")
    if not _verified(name, tensors, verify_now):
        return _next_verified(name, tensors, verify_now)
    return _BACKENDS[name]


def select_backend(tensors: Tensor | list[Tensor], backend: str | None = None) -> str:
    """The name of the backend that would run on ``tensors`` (gradients) with ``backend=``;
    raises as the call would when it cannot run them.

    >>> fusedclip.select_backend([torch.zeros(3)])
    'cpp'
    """
    items = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if not items:
        raise ValueError("select_backend needs at least one tensor (no gradients: no backend runs)")
    return select(parse(backend), items, verify_now=False).NAME


def fast_path(choice: Choice) -> tuple[Backend, bool] | None:
    """The backend whose one-call ``clip_params``/``norm_params`` the call tries first, and
    whether that path may take CUDA gradients only (others go the general way, which selects for
    them); None when there is none to try."""
    if choice.name != "auto":
        status = backend_status(choice.name)
        if not status.available:
            return None
        cuda_only = (choice.only or status.devices) == ("cuda",)
        return _fast_verified(choice.name, cuda_only)
    on_cpu = auto_name({"cpu"})
    if not torch.cuda.is_available():
        return _fast_verified(on_cpu, False)
    on_cuda = auto_name({"cuda"})
    return _fast_verified(on_cuda, on_cuda != on_cpu)


def _fast_verified(name: str, cuda_only: bool) -> tuple[Backend, bool] | None:
    """The one-call path reads the gradients in C++, after the choice: its backend is verified
    for every kernel dtype on the devices it may run (the current CUDA device, and the CPU unless
    ``cuda_only``); None (the general path, which verifies per call) where one failed."""
    status = backend_status(name)
    devices = []
    if torch.cuda.is_available() and status.runs_on("cuda"):
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    if not cuda_only and status.runs_on("cpu"):
        devices.append(torch.device("cpu"))
    for device in devices:
        if verify.needed(name, device) and not all(
                verify.check(name, _BACKENDS[name], device, dtype) for dtype in verify.DTYPES):
            return None
    return _BACKENDS[name], cuda_only
