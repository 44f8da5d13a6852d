"""fusedclip: global gradient-norm clipping for PyTorch in two passes over memory.

Drop-in replacements for ``torch.nn.utils.clip_grad_norm_``, ``get_total_norm``,
``clip_grads_with_norm_`` and ``clip_grad_value_``, with a keyword-only ``backend=`` (``cpp``: the
compiled engine, CPU and CUDA; ``triton``; ``reference``: fp64 PyTorch, the oracle;
``select_backend`` says which would run); the AMP path (``scaler=``, ``ClippingGradScaler``), soft
and per-tensor clipping (``clip_grad_norm_per_tensor_``), adaptive clipping
(``adaptive_clip_grad_``), automatic thresholds (``AutoClipper``) and sync-free monitoring
(``return_stats=``, ``StatsWindow``). ``BackwardClipper`` clips with no pass of its own (the norm
taken during backward, the coefficient applied by the optimizer's step). ``fusedclip.patch()``
routes torch's own functions through fusedclip (HF Trainer, Lightning).
"""

# First: importing it refuses a torch older than fusedclip supports, with a clear error.
from fusedclip import _versions  # noqa: F401
from fusedclip._select import available_backends, select_backend
from fusedclip.api import (
    adaptive_clip_grad_,
    clip_grad_norm_,
    clip_grad_norm_per_tensor_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
)
from fusedclip.auto import AutoClipper
from fusedclip.backends import BackendStatus, reference
from fusedclip.backward import BackwardClipper
from fusedclip.scaler import ClippingGradScaler
from fusedclip.stats import ClipStats, StatsWindow
from fusedclip.torch_patch import is_patched, patch, patched, unpatch

__version__ = "0.1.0"

__all__ = [
    "AutoClipper",
    "BackendStatus",
    "BackwardClipper",
    "ClipStats",
    "ClippingGradScaler",
    "StatsWindow",
    "adaptive_clip_grad_",
    "available_backends",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "is_patched",
    "patch",
    "patched",
    "reference",
    "select_backend",
    "unpatch",
]
