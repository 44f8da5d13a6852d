"""``ClippingGradScaler``: ``torch.amp.GradScaler`` with the fused unscale + clip as a method.

A second door to ``fusedclip.clip_grad_norm_(..., scaler=, optimizer=)`` (``fusedclip.amp``), for
code that passes a scaler around.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler

from fusedclip.api import clip_grad_norm_

__all__ = ["ClippingGradScaler"]


class ClippingGradScaler(GradScaler):
    """A ``torch.amp.GradScaler`` whose ``unscale_and_clip_`` unscales and clips in two passes.

    >>> scaler = fusedclip.ClippingGradScaler("cuda")
    >>> scaler.scale(loss).backward()
    >>> norm = scaler.unscale_and_clip_(optimizer, max_norm=1.0)
    >>> scaler.step(optimizer)
    >>> scaler.update()
    """

    def unscale_and_clip_(
        self,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        max_norm: float,
        norm_type: float = 2.0,
        *,
        parameters: object = None,
        error_if_nonfinite: bool = False,
        fold_into_optimizer: bool = False,
        backend: str | None = None,
    ) -> Tensor:
        """``unscale_(optimizer)`` and ``clip_grad_norm_(parameters, max_norm, norm_type)`` in
        the fused passes; ``parameters`` defaults to every parameter of ``optimizer``."""
        if parameters is None:
            opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
            parameters = [p for opt in opts for group in opt.param_groups for p in group["params"]]
        return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite,
                               backend=backend, scaler=self, optimizer=optimizer,
                               fold_into_optimizer=fold_into_optimizer)
