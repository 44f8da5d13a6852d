"""Python side of the ``torch.ops.fusedclip`` operators compiled in ``csrc/``.

The schemas live in ``csrc/ops.cpp``; this module adds what ``torch.compile`` needs to trace them
(fake implementations) and thin typed wrappers. It is imported by the package, so the fakes are
registered whenever the extension is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedclip import _extension


def norm_outputs_like(tensors: list[Tensor], per_tensor: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1's outputs as fake implementations describe them (here and for the Triton custom
    ops): fp64 norm and coefficient, 0-dim, and per-tensor norms (empty unless ``per_tensor``),
    on the tensors' device."""
    if not tensors:
        raise RuntimeError("fusedclip: expected at least one tensor")
    like = tensors[0].new_empty((), dtype=torch.float64)
    per = tensors[0].new_empty((len(tensors) if per_tensor else 0,), dtype=torch.float64)
    return like, like.clone(), per


if _extension.loaded():

    @torch.library.register_fake("fusedclip::scale_")
    def _scale_fake(tensors: list[Tensor], coef: Tensor) -> None:
        # In-place and returns nothing: there is no output to describe.
        return None

    @torch.library.register_fake("fusedclip::total_norm")
    def _total_norm_fake(
        tensors: list[Tensor],
        norm_type: float,
        max_norm: float,
        per_tensor: bool,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        soft: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return norm_outputs_like(tensors, per_tensor)

    @torch.library.register_fake("fusedclip::clip_")
    def _clip_fake(
        tensors: list[Tensor],
        max_norm: float,
        norm_type: float,
        per_tensor: bool,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        soft: bool = False,
    ) -> tuple[Tensor, Tensor]:
        norm, _, per = norm_outputs_like(tensors, per_tensor)
        return norm, per

    @torch.library.register_fake("fusedclip::clip_per_tensor_")
    def _clip_per_tensor_fake(
        tensors: list[Tensor], max_norms: Tensor, norm_type: float, soft: bool
    ) -> Tensor:
        return norm_outputs_like(tensors, True)[2]

    @torch.library.register_fake("fusedclip::adaptive_clip_")
    def _adaptive_clip_fake(
        grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float,
        norm_type: float,
    ) -> None:
        return None

    @torch.library.register_fake("fusedclip::clamp_")
    def _clamp_fake(tensors: list[Tensor], clip_value: float) -> None:
        return None


def scale_(tensors: list[Tensor], coef: Tensor) -> None:
    """``t <- t * coef`` for every tensor, in place, reading the fp64 one-element ``coef`` on the
    device; writes nothing when ``coef`` is exactly 1. The rescale pass of the fused clip."""
    torch.ops.fusedclip.scale_(tensors, coef)


def total_norm(
    tensors: list[Tensor],
    norm_type: float,
    max_norm: float = math.inf,
    per_tensor: bool = False,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1: (norm, clip coefficient, per-tensor norms) as fp64 device tensors; the per-tensor
    norms are an empty tensor unless ``per_tensor``. AMP: with ``inv_scale`` (one fp32 element)
    the norms are those of the unscaled values and the coefficient also unscales; ``found_inf``
    (one fp32 element) is set to 1 when any element is inf or NaN. ``soft``: the coefficient is
    ``max_norm / (norm + max_norm)``."""
    return torch.ops.fusedclip.total_norm(tensors, norm_type, max_norm, per_tensor, inv_scale,
                                          found_inf, soft)


def clip_(
    tensors: list[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    per_tensor: bool = False,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> tuple[Tensor, Tensor]:
    """Both passes: clip (and, given ``inv_scale``, unscale) in place; returns (fp64 norm,
    per-tensor norms or an empty tensor)."""
    return torch.ops.fusedclip.clip_(tensors, max_norm, norm_type, per_tensor, inv_scale,
                                     found_inf, soft)


def clip_per_tensor_(
    tensors: list[Tensor], max_norms: Tensor, norm_type: float = 2.0, soft: bool = False
) -> Tensor:
    """Per-tensor clipping, both passes: tensor i scaled by its own coefficient under
    ``max_norms[i]`` (fp64, one per tensor, on their device); returns the fp64 per-tensor norms."""
    return torch.ops.fusedclip.clip_per_tensor_(tensors, max_norms, norm_type, soft)


def clamp_(tensors: list[Tensor], clip_value: float) -> None:
    """Value clipping in one pass: every element clamped to ``[-clip_value, clip_value]``."""
    torch.ops.fusedclip.clamp_(tensors, clip_value)
