"""The ``triton`` backend: the two passes of the fused clip as Triton kernels.

Same table and arithmetic as the CUDA engine (csrc/table.h, csrc/norm_math.h): pass 1 writes one
(max, scaled sum) partial per 64Ki-element chunk, a one-program follow-up combines them in a fixed
order into the norm and the clip coefficient on the device, and pass 2 rescales in place unless the
coefficient is exactly 1. No host synchronization, no per-tensor launches: one launch per
(dtype, 16-byte alignment) group and pass.

The plan (the device-side table) is built here in Python and cached by every tensor's address,
size and dtype, so it is reused while the gradient storages stay the same; building one is a
blocking host-to-device copy and is refused inside a CUDA graph capture (run one call before
capturing). Keying costs a few hundred nanoseconds of Python per tensor. When ``fusedclip._C`` is
built, ``clip_grad_norm_(..., backend="triton")`` takes its C++ plan instead (``clip_params``):
the ``.grad``s are read and checked in C++ and only the launches are Python.

Kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
Triton was first imported (that is how CI tests their logic). The operators are registered with
``torch.library.custom_op`` (opaque to ``torch.compile``, with fake implementations): the kernels
read pointers out of a table, which the compiler could not trace through ``triton_op``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import struct
import threading

import torch
from torch import Tensor

from fusedclip import _extension
from fusedclip.fused import FusedOps

__all__ = [
    "clamp_", "clip_", "clip_params", "clip_with_norm_", "interpreting", "norm_params", "scale_",
    "total_norm",
]

_CACHE_SIZE = 8
_NUM_WARPS = 8


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _kernels():
    # Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be set before.
    import triton.language as tl

    from fusedclip.triton_kernels import norm, scale, table

    dtypes = {torch.float32: tl.float32, torch.float64: tl.float64,
              torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    return norm, scale, table.CHUNK, dtypes


def _f64_bits(x: float) -> int:
    """An fp64 value as the int64 with its bits: Triton passes Python floats as fp32."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


@dataclasses.dataclass(frozen=True)
class Group:
    dtype: torch.dtype
    aligned: bool  # every tensor's base address is a multiple of 16 bytes: vector accesses
    chunk_lo: int
    chunk_hi: int


@dataclasses.dataclass(frozen=True)
class Plan:
    device: torch.device
    table: Tensor  # int64 [3 * T + C] on device
    num_tensors: int
    num_chunks: int
    groups: tuple[Group, ...]
    result_dtype: torch.dtype


_PLANS: collections.OrderedDict[tuple, Plan] = collections.OrderedDict()
# Plans a captured CUDA graph reads: never evicted (the graph holds their table's address).
_PINNED: dict[tuple, Plan] = {}
_LOCK = threading.Lock()
plans_built = 0


def _key(t: Tensor) -> tuple[int, int, torch.dtype]:
    n = t.numel()
    return (t.data_ptr() if n else 0, n, t.dtype)


def _check_disjoint(keys: list[tuple[int, int, torch.dtype]]) -> None:
    spans = sorted(
        (addr, addr + n * torch.empty((), dtype=dt).element_size(), i)
        for i, (addr, n, dt) in enumerate(keys) if n
    )
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(
                f"gradients[{i}] and gradients[{j}] share memory (the same gradient passed twice, "
                "or overlapping views); the fused backends scale each element once, so pass each "
                "gradient once"
            )


def _build(keys: list[tuple[int, int, torch.dtype]], device: torch.device) -> Plan:
    global plans_built
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "backend 'triton' cannot build a plan inside a CUDA graph capture (its table is "
            "uploaded with a blocking copy); call it once on the same gradients before capturing"
        )
    _check_disjoint(keys)
    _, _, chunk, _ = _kernels()
    n = len(keys)
    first_chunk = [0] * n
    chunk_tensor: list[int] = []
    groups = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for aligned in (True, False):
            lo = len(chunk_tensor)
            for t, (addr, numel, dt) in enumerate(keys):
                if dt == dtype and (addr % 16 == 0) == aligned:
                    first_chunk[t] = len(chunk_tensor)
                    chunk_tensor += [t] * -(-numel // chunk)
            if len(chunk_tensor) > lo:
                groups.append(Group(dtype, aligned, lo, len(chunk_tensor)))
    host = [k[0] for k in keys] + [k[1] for k in keys] + first_chunk + chunk_tensor
    table = torch.tensor(host, dtype=torch.int64).to(device)
    result_dtype = functools.reduce(torch.promote_types, (k[2] for k in keys))
    plans_built += 1
    return Plan(device, table, n, len(chunk_tensor), tuple(groups), result_dtype)


def plan_for(tensors: list[Tensor]) -> Plan:
    """The cached plan of ``tensors`` (dense, kernel dtypes, one device), or a new one."""
    device = tensors[0].device
    keys = [_key(t) for t in tensors]
    key = (device, tuple(keys))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    with _LOCK:
        plan = _PLANS.get(key) or _PINNED.get(key)
        if plan is None:
            plan = _build(keys, device)
            _PLANS[key] = plan
            while len(_PLANS) > _CACHE_SIZE:
                _PLANS.popitem(last=False)
        elif key in _PLANS:
            _PLANS.move_to_end(key)
        if capturing:
            _PINNED[key] = plan
        elif device.type == "cuda":
            # Used on another stream than the one that allocated it: keep its memory from being
            # reused before this stream's kernels are done with it.
            plan.table.record_stream(torch.cuda.current_stream(device))
    return plan


def _check_device(tensors: list[Tensor]) -> None:
    device = tensors[0].device
    wanted = "cpu" if interpreting() else "cuda"
    if device.type != wanted:
        raise RuntimeError(
            "backend 'triton' runs CUDA tensors, or CPU tensors in Triton's interpreter "
            f"(TRITON_INTERPRET=1, which is {'on' if interpreting() else 'off'}); got {device}"
        )
    for i, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(f"gradients[{i}] is on {t.device} but gradients[0] is on {device}")


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_args(norm_type: float, max_norm: float) -> None:
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")


def _check_scalar(t: Tensor | None, dtype: torch.dtype, device: torch.device, name: str) -> None:
    if t is not None and (t.dtype != dtype or t.numel() != 1 or t.device != device):
        raise RuntimeError(
            f"{name} must be one {dtype} element on {device}, got {t.dtype} "
            f"{tuple(t.shape)} on {t.device}"
        )


def norm_pass(
    plan: Plan,
    norm_type: float,
    max_norm: float,
    per_tensor: bool,
    out_dtype: torch.dtype,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 1: (fp64 norm, fp64 coefficient, norm in ``out_dtype``, per-tensor norms or empty).
    ``inv_scale``/``found_inf``: the AMP path (see ``fusedclip.reference.total_norm``); the
    coefficient then also unscales."""
    _check_args(norm_type, max_norm)
    _check_scalar(inv_scale, torch.float32, plan.device, "inv_scale")
    _check_scalar(found_inf, torch.float32, plan.device, "found_inf")
    with _on(plan.device):
        return _norm_pass(plan, norm_type, max_norm, per_tensor, out_dtype, inv_scale, found_inf)


def _norm_pass(
    plan: Plan,
    norm_type: float,
    max_norm: float,
    per_tensor: bool,
    out_dtype: torch.dtype,
    inv_scale: Tensor | None,
    found_inf: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    norm_k, _, chunk, tl_dtype = _kernels()
    kind = norm_k.norm_kind(norm_type)
    f64 = dict(dtype=torch.float64, device=plan.device)
    partials = torch.empty(2 * max(plan.num_chunks, 1), **f64)
    p_bits = _f64_bits(norm_type if math.isfinite(norm_type) else 0.0)
    for g in plan.groups:
        plain = kind in (norm_k.KIND_ONE, norm_k.KIND_TWO) and g.dtype != torch.float64
        norm_k.chunk_partials[(g.chunk_hi - g.chunk_lo,)](
            plan.table, plan.num_tensors, g.chunk_lo, partials, p_bits,
            DT=tl_dtype[g.dtype], KIND=kind, PLAIN=plain, ALIGNED=g.aligned,
            CHUNK=chunk, BLOCK=norm_k.BLOCK, num_warps=_NUM_WARPS,
        )
    norm = torch.empty((), **f64)
    coef = torch.empty((), **f64)
    out = torch.empty((), dtype=out_dtype, device=plan.device)
    unscale = inv_scale is not None
    # Without a scale the kernels never touch these pointers (UNSCALE is a compile-time constant).
    inv_ptr = inv_scale if unscale else partials
    found_ptr = found_inf if found_inf is not None else partials
    norm_k.finish[(1,)](
        partials, plan.num_chunks, p_bits, _f64_bits(max_norm), norm, coef, out, inv_ptr,
        found_ptr, KIND=kind, OUT_DT=tl_dtype[out_dtype], FBLOCK=norm_k.FBLOCK,
        UNSCALE=unscale, FLAG=found_inf is not None, num_warps=_NUM_WARPS,
    )
    per = torch.empty(plan.num_tensors if per_tensor else 0, **f64)
    if per_tensor and plan.num_tensors:
        norm_k.per_tensor_norms[(plan.num_tensors,)](
            plan.table, plan.num_tensors, partials, p_bits, per, inv_ptr,
            KIND=kind, CHUNK=chunk, FBLOCK=norm_k.FBLOCK, UNSCALE=unscale, num_warps=4,
        )
    return norm, coef, out, per


def scale_pass(plan: Plan, coef: Tensor) -> None:
    """Pass 2: every tensor times ``coef`` (fp64 0-dim on the device), in place."""
    if coef.dtype != torch.float64 or coef.numel() != 1 or coef.device != plan.device:
        raise RuntimeError(
            f"coef must be one float64 element on {plan.device}, got {coef.dtype} "
            f"{tuple(coef.shape)} on {coef.device}"
        )
    norm_k, scale_k, chunk, tl_dtype = _kernels()
    with _on(plan.device):
        _scale_groups(plan, coef, norm_k, scale_k, chunk, tl_dtype)


def _scale_groups(plan: Plan, coef: Tensor, norm_k, scale_k, chunk: int, tl_dtype) -> None:
    for g in plan.groups:
        scale_k.scale[(g.chunk_hi - g.chunk_lo,)](
            plan.table, plan.num_tensors, g.chunk_lo, coef,
            DT=tl_dtype[g.dtype], ALIGNED=g.aligned, CHUNK=chunk, BLOCK=norm_k.BLOCK,
            num_warps=_NUM_WARPS,
        )


# ---- operators ---------------------------------------------------------------------------------

@torch.library.custom_op("fusedclip::triton_total_norm", mutates_args=("found_inf",))
def _total_norm_op(
    tensors: list[Tensor],
    norm_type: float,
    max_norm: float,
    per_tensor: bool,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    norm, coef, _, per = norm_pass(plan_for(tensors), norm_type, max_norm, per_tensor,
                                   torch.float64, inv_scale, found_inf)
    return norm, coef, per


@_total_norm_op.register_fake
def _(tensors, norm_type, max_norm, per_tensor, inv_scale=None, found_inf=None):
    like = tensors[0].new_empty((), dtype=torch.float64)
    return like, like.clone(), tensors[0].new_empty((len(tensors) if per_tensor else 0,),
                                                    dtype=torch.float64)


@torch.library.custom_op("fusedclip::triton_clip_", mutates_args=("tensors", "found_inf"))
def _clip_op(
    tensors: list[Tensor],
    max_norm: float,
    norm_type: float,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    plan = plan_for(tensors)
    norm, coef, _, _ = norm_pass(plan, norm_type, max_norm, False, torch.float64, inv_scale,
                                 found_inf)
    scale_pass(plan, coef)
    return norm


@_clip_op.register_fake
def _(tensors, max_norm, norm_type, inv_scale=None, found_inf=None):
    return tensors[0].new_empty((), dtype=torch.float64)


@torch.library.custom_op("fusedclip::triton_scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[Tensor], coef: Tensor) -> None:
    scale_pass(plan_for(tensors), coef)


@_scale_op.register_fake
def _(tensors, coef):
    return None


# ---- the backend interface (fusedclip.reference's) ---------------------------------------------

_OPS = FusedOps(
    "triton",
    norm=lambda ts, p, inv, found: _total_norm_op(ts, p, math.inf, False, inv, found)[0],
    clip=_clip_op,
    scale=_scale_op,
    check_device=_check_device,
)
total_norm = _OPS.total_norm
scale_ = _OPS.scale_
clip_with_norm_ = _OPS.clip_with_norm_
clip_ = _OPS.clip_
clamp_ = _OPS.clamp_


def _params_plan(
    params: list[Tensor], cuda_only: bool, writing: bool, unscaling: bool
) -> Plan | None:
    """The C++ plan of the ``.grad``s of ``params`` (``fusedclip._C``), or None. Unscaling
    GradScaler's gradients, fp16 ones also give None (the general path refuses them)."""
    if not _extension.loaded():
        return None
    info = _extension.module().plan_of_params(params, cuda_only, writing, not unscaling)
    if info is None:
        return None
    table, num_tensors, num_chunks, result_dtype, groups = info
    if table.device.type != ("cpu" if interpreting() else "cuda"):
        return None
    return Plan(table.device, table, num_tensors, num_chunks,
                tuple(Group(*g) for g in groups), result_dtype)


def clip_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor | None:
    """``clip_grad_norm_`` on ``params`` with the plan of ``fusedclip._C`` (its C++ loop over the
    ``.grad``s and its cache) and these kernels; the norm in torch's dtype, or None when
    ``fusedclip._C`` is not built or some gradient needs the general path. ``inv_scale`` and
    ``found_inf``: the AMP path."""
    plan = _params_plan(params, cuda_only, True, inv_scale is not None)
    if plan is None:
        return None
    _, coef, out, _ = norm_pass(plan, norm_type, max_norm, False, plan.result_dtype, inv_scale,
                                found_inf)
    scale_pass(plan, coef)
    return out


def norm_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Pass 1 of ``clip_params`` alone: (norm in torch's dtype, fp64 factor), or None."""
    plan = _params_plan(params, cuda_only, False, inv_scale is not None)
    if plan is None:
        return None
    _, coef, out, _ = norm_pass(plan, norm_type, max_norm, False, plan.result_dtype, inv_scale,
                                found_inf)
    return out, coef
