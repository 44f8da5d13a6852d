"""``fusedclip.patch()``: route ``torch.nn.utils``' clipping functions through fusedclip, so code
that calls torch's (HF ``Trainer`` through accelerate, Lightning's ``gradient_clip_val``, any
training loop) uses the fused kernels without changes.

Patched names, in ``torch.nn.utils`` and, where torch defines them there, in
``torch.nn.utils.clip_grad`` (so torch's deprecated ``clip_grad_norm`` follows too):
``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm``, ``clip_grads_with_norm_``.

Code that imported a function by name before ``patch()`` (``from torch.nn.utils import
clip_grad_norm_``) keeps torch's: patch early, before importing such code. The patched functions
take torch's arguments and behave as fusedclip's do (see ``fusedclip.api``: fp32/fp64
accumulation, and a clear error for a negative or NaN ``max_norm``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch.nn.utils
import torch.nn.utils.clip_grad

from fusedclip import _select, api

__all__ = ["is_patched", "patch", "patched", "torch_function", "unpatch"]

_NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
_MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)
# torch's own functions, taken when this module is first imported.
_TORCH = {(m, n): getattr(m, n) for m in _MODULES for n in _NAMES if hasattr(m, n)}


def torch_function(name: str) -> Callable:
    """torch's own ``torch.nn.utils.<name>``, patched or not (for comparisons and benchmarks)."""
    return _TORCH[(torch.nn.utils, name)]


def _routed(name: str, backend: str | None) -> Callable:
    @functools.wraps(torch_function(name))
    def routed(*args, **kwargs):
        # Looked up per call, so the routed function is whatever fusedclip.api holds now.
        return getattr(api, name)(*args, backend=backend, **kwargs)

    routed.__fusedclip_backend__ = backend
    return routed


def _install(functions: dict) -> None:
    for (module, name), fn in functions.items():
        setattr(module, name, fn)


def _current() -> dict:
    return {key: getattr(*key) for key in _TORCH}


def patch(*, backend: str | None = None) -> None:
    """Route torch's clipping functions through fusedclip (``backend=`` as in fusedclip's
    functions; checked now). Calling it again re-patches with the new ``backend``."""
    _select.parse(backend)
    routed = {name: _routed(name, backend) for name in _NAMES}
    _install({(module, name): routed[name] for module, name in _TORCH})


def unpatch() -> None:
    """Put torch's own functions back (a no-op when not patched)."""
    _install(_TORCH)


def is_patched() -> bool:
    return any(getattr(module, name) is not fn for (module, name), fn in _TORCH.items())


@contextlib.contextmanager
def patched(*, backend: str | None = None) -> Iterator[None]:
    """``with fusedclip.patched(): ...``: patched inside the block; afterwards the functions are
    what they were before it (torch's, or an outer patch's)."""
    before = _current()
    patch(backend=backend)
    try:
        yield
    finally:
        _install(before)
