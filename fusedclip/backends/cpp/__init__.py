"""The ``cpp`` backend: the compiled engine ``fusedclip._C`` (csrc/).

Pass 1 (``torch.ops.fusedclip.total_norm``) reads every gradient once and leaves the norm and the
clip coefficient on the device; pass 2 (``scale_``) rescales in place and writes nothing when the
coefficient is 1; ``clip_`` runs both. The tensor table behind them is a cached plan
(csrc/engine/plan.h), rebuilt only when a gradient's storage, size or dtype changes. The engine
has CPU kernels in every build and CUDA kernels when nvcc and a CUDA build of torch were there at
build time; ``status().devices`` says which this machine can use.

``BACKEND.clip_params`` / ``norm_params`` are the one-call path of ``clip_grad_norm_``: one C++
call reads every ``.grad``, checks the cached plan and launches the passes.
"""

from __future__ import annotations

import torch

from fusedclip.backends import BackendStatus
from fusedclip.backends._multi_tensor import FusedBackend, Operators
from fusedclip.backends.cpp import _lib

__all__ = ["BACKEND", "NAME", "status"]

NAME = "cpp"


def status() -> BackendStatus:
    if not _lib.loaded():
        return BackendStatus(False, f"fusedclip._C is not built ({_lib.LOAD_ERROR})")
    if not _lib.cuda_kernels():
        return BackendStatus(True, "fusedclip._C is built with its CPU kernels only (no nvcc or "
                             "a CPU-only torch at build time): CPU tensors", ("cpu",))
    built = f"fusedclip._C is built with its CPU and CUDA kernels (CUDA {torch.version.cuda})"
    if not torch.cuda.is_available():
        return BackendStatus(True, f"{built}; no CUDA device is visible: CPU tensors", ("cpu",))
    return BackendStatus(True, f"{built}: CPU and CUDA tensors", ("cpu", "cuda"))


def _missing(*args: object) -> None:
    raise RuntimeError(f"backend 'cpp' cannot run: fusedclip._C is not built ({_lib.LOAD_ERROR})")


def _operators() -> Operators:
    if not _lib.loaded():
        return Operators(*[_missing] * 8)
    ops = torch.ops.fusedclip
    return Operators(norm=ops.total_norm, clip=ops.clip_, scale=ops.scale_,
                     clip_per_tensor=ops.clip_per_tensor_, clamp=ops.clamp_,
                     adaptive_clip=ops.adaptive_clip_, partials=ops.partials_,
                     finish=ops.finish_partials)


def _run_params(params, max_norm, norm_type, cuda_only, inv_scale, found_inf, soft, scale):
    """The one-call path (``FusedBackend.clip_params``/``norm_params``): one C++ call reads every
    ``.grad``, checks the cached plan and launches the passes; None when some gradient needs the
    general path (not dense, not a kernel dtype, on several devices or one without kernels, a
    tensor subclass...) or there is none."""
    if not _lib.loaded():
        return None
    module = _lib.module()
    run = module.clip_params if scale else module.norm_params
    return run(params, max_norm, norm_type, cuda_only, inv_scale, found_inf, soft)


def _run_clamp(params, clip_value, cuda_only):
    """The one-call value clip (``FusedBackend.clamp_params``); False as ``_run_params`` says
    None."""
    return _lib.loaded() and _lib.module().clamp_params(params, clip_value, cuda_only)


BACKEND = FusedBackend(NAME, _operators(), status, _run_params, _run_clamp)
