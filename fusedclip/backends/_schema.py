"""The operator schemas the ``cpp`` and ``triton`` backends both implement, as Python sees them.

``fusedclip._C`` defines ``torch.ops.fusedclip.<op>`` (csrc/ops.cpp); the Triton backend defines
the same schemas as ``torch.ops.fusedclip.triton_<op>``. ``register_fakes`` gives either set the
fake implementations ``torch.compile`` traces them with: the ops write in place or return fresh
fp64 tensors whose shapes follow from the arguments alone.
"""

from __future__ import annotations

import types
import typing

import torch
from torch import Tensor

__all__ = ["OPS", "custom_op", "norm_outputs_like", "register_fakes"]

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


def _typing_form(hint: object) -> object:
    """``list[Tensor]`` as ``typing.List[Tensor]``, ``Tensor | None`` as
    ``typing.Optional[Tensor]``, ``tuple[...]`` as ``typing.Tuple[...]``, recursively."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return None  # "-> None", as get_type_hints spells it
    if origin is list:
        return typing.List[_typing_form(args[0])]  # noqa: UP006 (the form older torch reads)
    if origin is tuple:
        return typing.Tuple[tuple(_typing_form(a) for a in args)]  # noqa: UP006
    if origin in (types.UnionType, typing.Union):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return typing.Optional[_typing_form(rest[0])]  # noqa: UP045
    return hint


def custom_op(name: str, *, mutates_args: tuple[str, ...]):
    """``torch.library.custom_op`` for functions annotated in today's syntax (``list[Tensor]``,
    ``Tensor | None``), on every torch fusedclip supports: torch 2.6 reads only the ``typing``
    forms of these annotations, so where its ``infer_schema`` refuses the function, the
    annotations are given in those forms (the schema is the same)."""

    def register(fn):
        try:
            torch.library.infer_schema(fn, mutates_args=mutates_args)
        except ValueError:
            hints = typing.get_type_hints(fn)
            fn.__annotations__ = {k: _typing_form(v) for k, v in hints.items()}
        return torch.library.custom_op(name, mutates_args=mutates_args)(fn)

    return register
