"""Verification on first use: a backend that has never run on a kind of device is checked there
before it answers a call.

The fused kernels are tested on every submission on the CPU (the C++ engine's CPU kernels, the
Triton kernels in Triton's interpreter), but the CUDA kernels and the compiled Triton kernels have
not run on a GPU yet (README.md "Status"). So the first call of a process that would run such a
backend on such a device first runs it once per dtype on a small set chosen to cross the kernels'
boundaries (several chunks, many small tensors, a misaligned view, empty and one-element
tensors), and compares the norm and every clipped element with an fp64 computation made here. On
a mismatch or an error: a loud warning that says what differed and how to report it, that backend
is disabled for the process, and the call goes to the next backend that verifies (ending at the
reference, which needs none). It costs one small run per (backend, device, dtype) per process.

``FUSEDCLIP_VERIFY=0`` turns it off; ``=1`` verifies on every device, CPU included (how CI tests
it). Inside a CUDA graph capture, where it cannot run, the call raises: call once before
capturing. ``TESTED`` lists the (backend, device type) pairs that have run; when a device run
validates a pair it is added there, and verification stops for it.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor

__all__ = ["ENV_VAR", "TESTED", "VerificationError", "check", "disabled", "needed", "reset"]

ENV_VAR = "FUSEDCLIP_VERIFY"
# The (backend, device type) pairs that the test suite runs on every submission, or that a device
# run has validated (README.md "Status"). The reference needs no verification: it is the oracle.
TESTED = frozenset({("cpp", "cpu"), ("triton", "cpu")})
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The kernels' chunk is 64Ki elements: one tensor of three chunks and a bit, a misaligned view,
# many tiny ones and empty ones.
_SIZES = (3 * 65536 + 17, 1, 0, 4099, *(range(1, 300, 7)))
_REPORT = ("please report it at the project's issue tracker with this message, `python -m "
           "fusedclip check` and `python -m fusedclip backends`")

_verified: dict[tuple[str, str, torch.dtype], bool] = {}
_disabled: dict[tuple[str, str], str] = {}


class VerificationError(RuntimeError):
    """A verification that cannot run (inside a CUDA graph capture)."""


def _mode() -> str:
    value = os.environ.get(ENV_VAR, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0, 1 or unset, got {value!r}")
    return value or "auto"


def needed(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` must be verified on ``device`` before it runs there."""
    if name == "reference" or torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and not torch.cuda.is_available():
        return False  # tensors that only pretend to be there (fake or meta ones): nothing to run
    mode = _mode()
    if mode == "0":
        return False
    return mode == "1" or (name, device.type) not in TESTED


def disabled(name: str, device: torch.device) -> str | None:
    """Why ``name`` was disabled on devices of this kind in this process (None: it is not)."""
    return _disabled.get((name, _key(device)))


def _key(device: torch.device) -> str:
    return str(device)


def reset() -> None:
    """Forget every verification (tests)."""
    _verified.clear()
    _disabled.clear()


def _inputs(dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1234)
    tensors = []
    for i, n in enumerate(_SIZES):
        extra = 1 if i == 3 else 0  # one view a single element into its storage: misaligned
        t = torch.randn(n + extra, generator=gen, dtype=torch.float64).to(dtype)
        tensors.append(t.to(device)[extra:])
    return tensors


def _expected(tensors: list[Tensor], norm_type: float, max_norm: float) -> tuple[float, float]:
    flat = torch.cat([t.detach().double().cpu().reshape(-1) for t in tensors]).abs()
    norm = float(flat.max()) if math.isinf(norm_type) else float(flat.pow(norm_type).sum()) ** (
        1.0 / norm_type)
    return norm, min(1.0, max_norm / (norm + 1e-6))


def _compare(backend, dtype: torch.dtype, device: torch.device) -> str | None:
    """What differed (None: nothing) between ``backend`` and the fp64 computation."""
    for norm_type in (2.0, math.inf):
        tensors = _inputs(dtype, device)
        before = [t.detach().double().cpu().clone() for t in tensors]
        norm, coef = _expected(tensors, norm_type, 0.5)
        got = float(backend.clip_(tensors, 0.5, norm_type))
        if not math.isclose(got, norm, rel_tol=1e-5):
            return f"the {norm_type}-norm of {dtype} tensors is {got!r}, expected {norm!r}"
        info = torch.finfo(dtype)
        # One rounding of the dtype, also where the result is subnormal.
        rtol, atol = info.eps, info.smallest_normal * info.eps
        for i, (t, b) in enumerate(zip(tensors, before)):
            want = (b * coef).to(dtype).double()
            got_t = t.double().cpu()
            if not torch.allclose(got_t, want, rtol=rtol, atol=atol):
                worst = float(((got_t - want).abs() - rtol * want.abs()).max())
                return (f"clipped {dtype} tensor {i} ({t.numel()} elements) is off by up to "
                        f"{worst:.3g} beyond one rounding")
    return None


def check(name: str, backend, device: torch.device, dtype: torch.dtype) -> bool:
    """Backend ``name`` verified on ``device`` for ``dtype`` (run now if it was not); False when
    it failed, now or before (then it is disabled on that device, with a warning)."""
    key = (name, _key(device), dtype)
    if key in _verified:
        return _verified[key]
    if (name, _key(device)) in _disabled:
        return False
    if device.type == "cuda" and torch.cuda.is_available() and \
            torch.cuda.is_current_stream_capturing():
        raise VerificationError(
            f"fusedclip verifies backend {name!r} on {device} on its first call there, which "
            "cannot run inside a CUDA graph capture: call the clip once before capturing (or set "
            f"{ENV_VAR}=0)")
    try:
        problem = _compare(backend, dtype, device)
    except Exception as exc:  # a kernel that fails is as unusable as one that is wrong
        problem = f"it raised {type(exc).__name__}: {exc}"
    _verified[key] = problem is None
    if problem is not None:
        _disabled[(name, _key(device))] = problem
        warnings.warn(
            f"fusedclip: backend {name!r} failed its verification on {device} and is disabled "
            f"for this process: {problem}. The calls go to the next backend that verifies "
            f"(ending at 'reference'). This is a bug in fusedclip: {_REPORT}.",
            RuntimeWarning, stacklevel=3)
    return problem is None
