"""The compiled extension ``fusedclip._C``: loading it, and what Python adds to its operators.

Importing ``fusedclip._C`` registers the ``torch.ops.fusedclip`` operators (csrc/ops.cpp) with the
dispatcher, with CPU kernels always and CUDA kernels when it was built with them
(``CUDA_KERNELS``). A missing or broken build is not an error here: the package still runs on the
Triton and reference backends, and ``fusedclip.available_backends()`` says why ``cpp`` cannot run.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from fusedclip.backends._schema import register_fakes

_log = logging.getLogger("fusedclip")

_MODULE: ModuleType | None = None
LOAD_ERROR: str | None = None
try:
    _MODULE = importlib.import_module("fusedclip._C")  # registers the operators
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    _log.info("fusedclip._C is not available (%s); using the Python backends", LOAD_ERROR)
else:
    register_fakes()


def module() -> ModuleType:
    """``fusedclip._C`` itself (its plain functions: the clip fast path, plan-cache helpers)."""
    if _MODULE is None:
        raise RuntimeError(f"fusedclip._C is not built: {LOAD_ERROR}")
    return _MODULE


def loaded() -> bool:
    """Whether ``fusedclip._C`` imported and registered its operators."""
    return _MODULE is not None


def cuda_kernels() -> bool:
    """Whether ``fusedclip._C`` was built with its CUDA kernels (not only the CPU engine)."""
    return _MODULE is not None and bool(_MODULE.CUDA_KERNELS)


def op_names() -> list[str]:
    """The operators registered in the ``fusedclip`` namespace, e.g. ``['scale_']``."""
    prefix = "fusedclip::"
    return sorted(
        name[len(prefix) :].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith(prefix)
    )
