"""The operator schemas the ``cpp`` and ``triton`` backends both implement, as Python sees them.

``fusedclip._C`` defines ``torch.ops.fusedclip.<op>`` (csrc/ops.cpp); the Triton backend defines
the same schemas as ``torch.ops.fusedclip.triton_<op>``. ``register_fakes`` gives either set the
fake implementations ``torch.compile`` traces them with: the ops write in place or return fresh
fp64 tensors whose shapes follow from the arguments alone.
"""

from __future__ import annotations

import inspect
import types
import typing
import warnings

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


def _bump_versions(value: object) -> None:
    for t in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(t, Tensor):
            torch.autograd.graph.increment_version(t)


def _omitted_args_fail() -> bool:
    """Whether this torch's custom ops raise IndexError on a call whose trailing defaulted mutable
    argument was left out (torch 2.6 and 2.11 among those CI tests: their kernel indexes the call's
    arguments by the schema's positions; 2.13 fills the defaults in first, 2.14 checks the
    length). Read off the kernel's source, so that no release in between is guessed."""
    source = inspect.getsource(torch._library.custom_ops.CustomOpDef._register_to_dispatcher)
    return "increment_version(args[idx])" in source and "idx < len(args)" not in source


def _skip_omitted_mutable_args(op) -> None:
    """Torch 2.6 and 2.11's custom ops bump the version counter of each mutable argument found by
    its position in the call, and the dispatcher leaves out trailing arguments equal to their
    defaults: a call with ``found_inf=None`` raised IndexError there. The op's ADInplaceOrView
    kernel is replaced by the same kernel, which skips the arguments not given (None: nothing to
    bump)."""
    schema = op._opoverload._schema
    written = [(i, a.name, a.kwarg_only) for i, a in enumerate(schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]

    def ad_inplace_or_view(keyset, *args, **kwargs):
        for i, arg_name, kwarg_only in written:
            if not kwarg_only and i < len(args):
                _bump_versions(args[i])
            elif arg_name in kwargs:
                _bump_versions(kwargs[arg_name])
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return op._opoverload.redispatch(
                keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)

    # torch.library refuses a second Python kernel for a key it has seen; the dispatcher takes it
    # (the newest wins) with a warning, which is the point here.
    torch.library._impls.discard(f"{op._namespace}/{op._name}/ADInplaceOrView")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        op._lib.impl(op._name, ad_inplace_or_view, "ADInplaceOrView", with_keyset=True)


_OMITTED_ARGS_FAIL = _omitted_args_fail()


def custom_op(name: str, *, mutates_args: tuple[str, ...]):
    """``torch.library.custom_op`` for functions annotated in today's syntax (``list[Tensor]``,
    ``Tensor | None``), on every torch fusedclip supports: torch 2.6 reads only the ``typing``
    forms of these annotations, so where its ``infer_schema`` refuses the function, the
    annotations are given in those forms (the schema is the same); and where a call that leaves out
    a mutable argument would fail (torch 2.6, 2.11), the op's in-place bookkeeping is mended
    (``_skip_omitted_mutable_args``)."""

    def register(fn):
        try:
            torch.library.infer_schema(fn, mutates_args=mutates_args)
        except ValueError:
            hints = typing.get_type_hints(fn)
            fn.__annotations__ = {k: _typing_form(v) for k, v in hints.items()}
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        if mutates_args and _OMITTED_ARGS_FAIL:
            _skip_omitted_mutable_args(op)
        return op

    return register

