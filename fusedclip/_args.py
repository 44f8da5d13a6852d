"""Argument collection and validation for the public API.

Everything here runs before any gradient is touched, so a bad argument raises with the gradients
left exactly as they were.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from fusedclip.backends._multi_tensor import is_dense

TensorOrTensors = Tensor | Iterable[Tensor]


def collect_tensors(
    tensors: TensorOrTensors,
    *,
    name: str,
    warn_empty_generator: bool = False,
    check_items: bool = True,
) -> list[Tensor]:
    """A list from a tensor or an iterable of tensors, checking every item is a tensor (unless
    ``check_items=False``: then call ``check_tensor_items`` before trusting the items).

    Like torch, an empty *generator* of parameters warns (it is usually an exhausted
    ``model.parameters()``); an empty list does not.
    """
    if isinstance(tensors, Tensor):
        return [tensors]
    is_generator = isinstance(tensors, types.GeneratorType)
    try:
        items = list(tensors)
    except TypeError:
        raise TypeError(
            f"{name} must be a Tensor or an iterable of Tensors, got {type(tensors).__name__}"
        ) from None
    if check_items:
        check_tensor_items(items, name)
    if warn_empty_generator and is_generator and not items:
        # stacklevel 4: this function, the public function, its torch.no_grad wrapper, the caller.
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=4
        )
    return items


def check_tensor_items(items: list[object], name: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, Tensor):
            raise TypeError(f"{name}[{i}] is a {type(item).__name__}, expected a torch.Tensor")


def grads_of(params: list[Tensor]) -> list[Tensor]:
    """The gradients of ``params`` that exist, in order."""
    return [p.grad for p in params if p.grad is not None]


def check_grad_dtypes(tensors: list[Tensor], name: str = "gradients") -> None:
    """Norms are taken of floating or complex tensors only (torch raises on integers too)."""
    for i, t in enumerate(tensors):
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(
                f"{name}[{i}] has dtype {t.dtype}; expected a floating or complex dtype"
            )


def check_dense_real_grads(grads: list[Tensor], what: str) -> None:
    """``what`` works on dense real gradients only: clamping has no order for complex values,
    unit norms have no rows in a sparse tensor (torch's clamp_ and timm's unitwise norm raise on
    them too, after writing the gradients before)."""
    for i, g in enumerate(grads):
        if g.layout != torch.strided:
            raise TypeError(f"gradients[{i}] is a {g.layout} tensor; {what} takes dense "
                            "gradients only")
        if g.is_complex():
            raise TypeError(f"gradients[{i}] has dtype {g.dtype}; {what} takes real (floating) "
                            "gradients only")


def check_writable_grads(grads: list[Tensor]) -> None:
    """Gradients about to be modified in place: right dtypes, memory that can be written in
    place, and no element shared between two of them or stored twice in one (``check_disjoint``).

    torch fails on an inference tensor or a self-overlapping gradient (an ``expand``-ed tensor)
    only when it reaches it, after scaling the ones before it; fusedclip refuses before touching
    any.
    """
    check_grad_dtypes(grads)
    if torch.compiler.is_compiling():
        return  # (data pointers and these flags are the runtime's; see check_disjoint)
    for i, g in enumerate(grads):
        if g._is_zerotensor():
            raise ValueError(f"gradients[{i}] is a ZeroTensor, which has no memory to write in "
                             "place; give it its own storage (.clone())")
        if g.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(
                f"gradients[{i}] is an inference tensor (made under torch.inference_mode()), "
                "which cannot be written in place outside inference mode; clone it first, or "
                "call inside inference mode"
            )
    check_disjoint(grads)


# A gradient the call writes (or, for get_total_norm, reads) twice where torch would take the
# element once per appearance: scaled twice, or counted twice. Refused instead, by every backend
# and every function, with these messages. (The compiled engine's one-call path refuses dense
# gradients that share memory with the same words: csrc/engine/plan.cpp check_disjoint.)
SHARED_MESSAGE = (
    "{name}[{i}] and {name}[{j}] share memory (the same tensor twice, or views of one buffer); "
    "fusedclip takes every element once: give each its own storage (.clone())"
)
SELF_SHARED_MESSAGE = (
    "{name}[{i}] has elements that share memory (an expand()-ed or overlapping as_strided view); "
    "fusedclip takes every element once: give it its own storage (.clone())"
)


def _memory(t: Tensor) -> Tensor | None:
    """The strided tensor whose memory ``t`` reads and writes (a sparse tensor's values), or None
    when it has none to share: no elements, a meta tensor, a ZeroTensor, other layouts."""
    if t.layout is not torch.strided:
        if t.layout is not torch.sparse_coo:
            return None
        t = t._values()
    if t.nbytes == 0 or t.is_meta or t._is_zerotensor():
        return None
    return t


def _byte_span(t: Tensor) -> tuple[int, int]:
    """[first, end) byte addresses of ``t``'s elements (torch's strides are never negative)."""
    start = t.data_ptr()
    if t.is_contiguous():  # (torch.Size costs a microsecond: not read for the common case)
        return start, start + t.nbytes
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _element_addresses(t: Tensor) -> Tensor:
    """The address of every element of ``t``, int64 on the CPU, built from its sizes and strides
    alone (nothing of ``t`` is read or copied): for the exact tests, when the spans say maybe."""
    offsets = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return offsets.reshape(-1) * t.element_size() + t.data_ptr()


def _overlaps_itself(t: Tensor) -> bool:
    """Whether two elements of ``t`` share memory. Its dims by increasing stride: when each
    stride passes the farthest offset the smaller ones reach, every element has its own offset;
    otherwise (a 0 stride, or strides that interleave) the offsets themselves are compared."""
    if is_dense(t):
        return False
    reach = 0
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride <= reach:
            break
        reach += stride * (size - 1)
    else:
        return False
    addresses = _element_addresses(t).sort().values
    return bool((addresses[1:] == addresses[:-1]).any())


def _share_elements(a: Tensor, b: Tensor) -> bool:
    """Whether an element of ``a`` and one of ``b`` share a byte, given that their spans meet. A
    dense tensor covers its whole span, so only the other one's elements are listed; two views
    with gaps (``b[::2]`` and ``b[1::2]`` meet but share nothing) are compared element by
    element."""
    if is_dense(b):
        a, b = b, a
    if is_dense(a):
        start, end = _byte_span(a)
        at = _element_addresses(b)
        return bool(((at < end) & (at + b.element_size() > start)).any())
    at_a = _element_addresses(a).sort().values
    at_b = _element_addresses(b)
    # Each element of b against the nearest element of a at or below it and the next one above.
    after = torch.searchsorted(at_a, at_b, right=True)
    below = at_a[(after - 1).clamp(min=0)]
    above = at_a[after.clamp(max=at_a.numel() - 1)]
    hits_below = (after > 0) & (below + a.element_size() > at_b)
    hits_above = (after < at_a.numel()) & (above < at_b + b.element_size())
    return bool((hits_below | hits_above).any())


def check_disjoint(tensors: list[Tensor], name: str = "gradients") -> None:
    """Raises ``ValueError`` naming them when two of ``tensors`` share an element, or one stores
    an element twice; touches nothing.

    Cheap for what training loops pass (about a microsecond a tensor, most of it reading its
    address and size): each tensor's byte span, one sort per device, and a sweep in which
    disjoint spans meet nothing; only spans that meet (or a view whose strides interleave) have
    their element addresses compared, from sizes and strides, without reading or copying any
    gradient. Under ``torch.compile`` the check is left to the runtime's operators (they refuse
    dense gradients that share memory).
    """
    if torch.compiler.is_compiling():
        return
    spans: dict[torch.device, list[tuple[int, int, int]]] = {}
    memory: dict[int, Tensor] = {}
    for i, t in enumerate(tensors):
        mem = _memory(t)
        if mem is None:
            continue
        if not mem.is_contiguous() and _overlaps_itself(mem):
            raise ValueError(SELF_SHARED_MESSAGE.format(name=name, i=i))
        memory[i] = mem
        spans.setdefault(mem.device, []).append((*_byte_span(mem), i))
    for group in spans.values():
        group.sort()
        farthest = 0  # the largest end of the spans so far
        open_spans: list[tuple[int, int]] = []  # (end, index) of those reaching past here
        for start, end, i in group:
            if start >= farthest:  # meets none of them
                open_spans = [(end, i)]
            else:
                open_spans = [o for o in open_spans if o[0] > start]
                for _, j in open_spans:
                    if _share_elements(memory[j], memory[i]):
                        raise ValueError(SHARED_MESSAGE.format(name=name, i=min(i, j),
                                                               j=max(i, j)))
                open_spans.append((end, i))
            farthest = max(farthest, end)


def _as_float(value: object, name: str) -> float:
    if isinstance(value, Tensor) and value.numel() != 1:
        raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        # Keep float()'s class, as torch does: ValueError for a string, TypeError for None.
        raise type(exc)(f"{name} must be a number, got {value!r}") from None


def as_threshold(value: object, name: str) -> float:
    """A non-negative, non-NaN float (``inf`` allowed): used for ``max_norm`` and ``clip_value``."""
    x = _as_float(value, name)
    if math.isnan(x) or x < 0:
        raise ValueError(f"{name} must be a non-negative number, got {x}")
    return x


CLIP_MODES = ("hard", "soft")


def as_soft(mode: object) -> bool:
    """``mode``: ``"hard"`` (torch's ``min(1, max_norm / (norm + 1e-6))``) or ``"soft"``
    (``max_norm / (norm + max_norm)``); True for soft."""
    if mode not in CLIP_MODES:
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    return mode == "soft"


def as_thresholds(value: object, count: int, name: str = "max_norm") -> Tensor:
    """One non-negative, non-NaN threshold per tensor, as fp64 on the CPU: a number for all, or a
    sequence (or 1-D tensor, read on the host) of ``count`` numbers."""
    if isinstance(value, Tensor) and value.dim() == 1 or isinstance(value, (list, tuple)):
        if isinstance(value, Tensor):
            if value.is_complex() or value.dtype == torch.bool:
                raise TypeError(f"{name} must be real, got {value.dtype}")
            limits = value.detach().to(device="cpu", dtype=torch.float64)
        else:
            limits = torch.tensor([_as_float(v, name) for v in value], dtype=torch.float64)
        if limits.numel() != count:
            raise ValueError(
                f"{name} has {limits.numel()} thresholds, but there are {count} gradients (one "
                "threshold per parameter that has a gradient)"
            )
        bad = torch.isnan(limits) | (limits < 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}[{i}] must be a non-negative number, got {float(limits[i])}")
        return limits
    return torch.full((count,), as_threshold(value, name), dtype=torch.float64)


def as_stats_request(return_stats: object) -> bool:
    """``return_stats``: False, True or ``"per_tensor"``; whether per-tensor norms are asked for."""
    if return_stats not in (False, True, "per_tensor"):
        raise ValueError(f"return_stats must be False, True or 'per_tensor', got {return_stats!r}")
    return return_stats == "per_tensor"


NAN_NORM_TYPE_MESSAGE = (
    "norm_type must not be NaN (a norm of order NaN is not defined: torch's clip_grad_norm_ "
    "returns NaN for it and writes NaN into the gradients)"
)


def as_norm_type(value: object) -> float:
    """A float torch's ``clip_grad_norm_`` takes: p > 0 and inf (the passes), and 0, negative p
    and -inf (``fusedclip.backends._math.general_norm``); ``'inf'`` as a string, as in torch.
    NaN is refused: torch returns a NaN norm for it (the one element itself when there is one)
    and writes NaN into the gradients."""
    p = _as_float(value, "norm_type")
    if math.isnan(p):
        raise ValueError(NAN_NORM_TYPE_MESSAGE)
    return p


def as_pass_norm_type(value: object, what: str) -> float:
    """A norm type for ``what``, which only the passes compute: p > 0 or inf."""
    p = as_norm_type(value)
    if not p > 0:
        raise ValueError(
            f"{what} takes norm_type p > 0 or inf, got {p} (clip_grad_norm_ and get_total_norm "
            "take every norm type torch does)"
        )
    return p


def as_total_norm(value: object) -> Tensor:
    """``clip_grads_with_norm_``'s ``total_norm``: a one-element tensor or a number."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"total_norm must hold one value, got a tensor of shape {tuple(value.shape)}"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"total_norm must be a real tensor, got {value.dtype}")
        return value.reshape(())
    x = _as_float(value, "total_norm")
    return torch.tensor(x, dtype=torch.float64)


def _norm_dtype(t: Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def norm_result_dtype(tensors: list[Tensor]) -> torch.dtype:
    """The dtype of a returned norm: the gradients' (real) dtypes promoted together and with
    float32, so that it holds the fp64 norm to 1e-5 for every dtype (torch returns a bf16 norm for
    bf16 gradients: 83.0 for 82.83, and inf for an fp16 norm past 65504)."""
    return functools.reduce(torch.promote_types, (_norm_dtype(t) for t in tensors), torch.float32)


NONFINITE_MESSAGE = (
    "The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
    "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
    "anyway, set `error_if_nonfinite=False`"
)


def raise_if_nonfinite(norm: Tensor, norm_type: float) -> None:
    """torch's ``error_if_nonfinite`` check. It reads the norm on the host: a synchronization."""
    if not bool(torch.isfinite(norm)):
        raise RuntimeError(NONFINITE_MESSAGE.format(norm_type=norm_type))
