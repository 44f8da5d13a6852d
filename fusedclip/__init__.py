"""fusedclip: global gradient-norm clipping in the fewest passes over GPU memory.

Drop-in replacements for ``torch.nn.utils.clip_grad_norm_``, ``get_total_norm``,
``clip_grads_with_norm_`` and ``clip_grad_value_``, with a keyword-only ``backend=``.
``fusedclip.reference`` is the fp64 oracle every kernel is tested against.
"""

from fusedclip import ops  # noqa: F401  (registers the fake implementations of fusedclip._C)
from fusedclip.amp import ClippingGradScaler
from fusedclip.api import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from fusedclip.backends import BackendStatus, available_backends

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "ClippingGradScaler",
    "available_backends",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]
