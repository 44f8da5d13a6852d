"""fusedclip: global gradient-norm clipping in the fewest passes over GPU memory.

Drop-in replacements for ``torch.nn.utils.clip_grad_norm_``, ``get_total_norm``,
``clip_grads_with_norm_`` and ``clip_grad_value_``, with a keyword-only ``backend=``; the AMP
path (``scaler=``, ``ClippingGradScaler``), soft and per-tensor clipping
(``clip_grad_norm_per_tensor_``), adaptive clipping (``adaptive_clip_grad_``), automatic
thresholds (``AutoClipper``) and sync-free monitoring (``return_stats=``, ``StatsWindow``).
``fusedclip.patch()`` routes torch's own functions through fusedclip (HF Trainer, Lightning).
``fusedclip.reference`` is the fp64 oracle every kernel is tested against.
"""

from fusedclip import ops  # noqa: F401  (registers the fake implementations of fusedclip._C)
from fusedclip.amp import ClippingGradScaler
from fusedclip.api import (
    adaptive_clip_grad_,
    clip_grad_norm_,
    clip_grad_norm_per_tensor_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
)
from fusedclip.auto import AutoClipper
from fusedclip.backends import BackendStatus, available_backends
from fusedclip.stats import ClipStats, StatsWindow
from fusedclip.torch_patch import is_patched, patch, patched, unpatch

__version__ = "0.1.0"

__all__ = [
    "AutoClipper",
    "BackendStatus",
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
    "unpatch",
]
