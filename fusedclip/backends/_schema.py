"""The operator schemas the ``cpp`` and ``triton`` backends both implement, as Python sees them.

``fusedclip._C`` defines ``torch.ops.fusedclip.<op>`` (csrc/ops.cpp); the Triton backend defines
the same schemas as ``torch.ops.fusedclip.triton_<op>``. ``register_fakes`` gives either set the
fake implementations ``torch.compile`` traces them with: the ops write in place or return fresh
fp64 tensors whose shapes follow from the arguments alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["OPS", "norm_outputs_like", "register_fakes"]

OPS = ("scale_", "total_norm", "clip_", "clip_per_tensor_", "clamp_", "adaptive_clip_",
       "partials_", "finish_partials")


def norm_outputs_like(tensors: list[Tensor], per_tensor: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Pass 1's outputs: fp64 norm and coefficient, 0-dim, and per-tensor norms (empty unless
    ``per_tensor``), on the tensors' device."""
    if not tensors:
        raise RuntimeError("fusedclip: expected at least one tensor")
    like = tensors[0].new_empty((), dtype=torch.float64)
    per = tensors[0].new_empty((len(tensors) if per_tensor else 0,), dtype=torch.float64)
    return like, like.clone(), per


def _nothing(*args: object, **kwargs: object) -> None:
    # In-place ops that return nothing: there is no output to describe.
    return None


def _total_norm(tensors, norm_type, max_norm, per_tensor, inv_scale=None, found_inf=None,
                soft=False):
    return norm_outputs_like(tensors, per_tensor)


def _clip(tensors, max_norm, norm_type, per_tensor, inv_scale=None, found_inf=None, soft=False):
    norm, _, per = norm_outputs_like(tensors, per_tensor)
    return norm, per


def _clip_per_tensor(tensors, max_norms, norm_type, soft):
    return norm_outputs_like(tensors, True)[2]


def _finish_partials(partials, norm_type, max_norm, inv_scale=None, found_inf=None, soft=False):
    like = partials.new_empty((), dtype=torch.float64)
    return like, like.clone()


_FAKES = {"scale_": _nothing, "total_norm": _total_norm, "clip_": _clip,
          "clip_per_tensor_": _clip_per_tensor, "clamp_": _nothing, "adaptive_clip_": _nothing,
          "partials_": _nothing, "finish_partials": _finish_partials}


def register_fakes(prefix: str = "") -> None:
    """Fake implementations for ``fusedclip::<prefix><op>`` of every op in ``OPS``."""
    for op in OPS:
        torch.library.register_fake(f"fusedclip::{prefix}{op}", _FAKES[op])
