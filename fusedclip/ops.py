"""Python side of the ``torch.ops.fusedclip`` operators compiled in ``csrc/``.

The schemas live in ``csrc/ops.cpp``; this module adds what ``torch.compile`` needs to trace them
(fake implementations) and thin typed wrappers. It is imported by the package, so the fakes are
registered whenever the extension is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedclip import _extension

if _extension.loaded():

    @torch.library.register_fake("fusedclip::scale_")
    def _scale_fake(tensors: list[Tensor], coef: Tensor) -> None:
        # In-place and returns nothing: there is no output to describe.
        return None


def scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """``t <- t * coef`` for every tensor, in place, reading the fp64 one-element ``coef`` on the
    device; writes nothing when ``coef`` is exactly 1. The rescale pass of the fused clip."""
    torch.ops.fusedclip.scale_(tensors, coef)
