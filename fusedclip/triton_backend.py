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
from fusedclip.ops import norm_outputs_like

__all__ = [
    "adaptive_clip_", "clamp_", "clip_", "clip_params", "clip_per_tensor_", "clip_stats_",
    "clip_with_norm_", "interpreting",
    "norm_params", "scale_", "total_norm",
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


def _unit_keys(tensors: list[Tensor]) -> list[tuple[int, int, torch.dtype]]:
    """Adaptive clipping's units as plan entries (csrc/ops.cpp append_units): each row of a
    tensor of two or more dims, the whole tensor otherwise, none for an empty one."""
    keys = []
    for t in tensors:
        n = t.numel()
        if n:
            rows = t.shape[0] if t.dim() > 1 else 1
            step, base = n // rows * t.element_size(), t.data_ptr()
            keys += [(base + i * step, n // rows, t.dtype) for i in range(rows)]
    return keys


def plan_for(tensors: list[Tensor], units: bool = False) -> Plan:
    """The cached plan of ``tensors`` (dense, kernel dtypes, one device), or a new one. With
    ``units`` its entries are adaptive clipping's units (``_unit_keys``, contiguous tensors)."""
    device = tensors[0].device
    if units:
        key = (device, "units", tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors))
    else:
        keys = [_key(t) for t in tensors]
        key = (device, tuple(keys))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    with _LOCK:
        plan = _PLANS.get(key) or _PINNED.get(key)
        if plan is None:
            plan = _build(_unit_keys(tensors) if units else keys, device)
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


@dataclasses.dataclass(frozen=True)
class Request:
    """What pass 1 computes (csrc/passes.h's NormRequest): the norm and coefficient, the norm in
    ``out_dtype``, per-tensor norms when ``per_tensor``; AMP: ``inv_scale``/``found_inf`` (see
    ``fusedclip.reference.total_norm``); ``soft`` coefficients; per-tensor clipping: one
    coefficient per tensor from ``max_norms`` (fp64, one per tensor) or, with ``per_tensor_coef``,
    from ``max_norm``; ``adaptive`` (AGC): the coefficients of adaptive clipping, ``max_norms``
    being the parameters' unit norms."""

    norm_type: float
    max_norm: float = math.inf
    per_tensor: bool = False
    out_dtype: torch.dtype = torch.float64
    inv_scale: Tensor | None = None
    found_inf: Tensor | None = None
    soft: bool = False
    max_norms: Tensor | None = None
    per_tensor_coef: bool = False
    adaptive: tuple[float, float] | None = None  # (eps, clip_factor): max_norms are unit norms
    totals: bool = True  # the norm and coefficient over all tensors (finish); else left unset


@dataclasses.dataclass(frozen=True)
class Pass1:
    """Pass 1's outputs: fp64 norm and coefficient, the norm in the requested dtype, per-tensor
    norms and coefficients (empty unless requested)."""

    norm: Tensor
    coef: Tensor
    out: Tensor
    per_tensor: Tensor
    per_tensor_coef: Tensor


def norm_pass(plan: Plan, req: Request) -> Pass1:
    """Pass 1 over a plan, on its device."""
    _check_args(req.norm_type, req.max_norm)
    _check_scalar(req.inv_scale, torch.float32, plan.device, "inv_scale")
    _check_scalar(req.found_inf, torch.float32, plan.device, "found_inf")
    if req.max_norms is not None and (
        req.max_norms.dtype != torch.float64 or req.max_norms.shape != (plan.num_tensors,)
        or req.max_norms.device != plan.device or not req.max_norms.is_contiguous()
    ):
        raise RuntimeError(
            f"max_norms must be a contiguous float64 tensor of {plan.num_tensors} thresholds on "
            f"{plan.device}, got {req.max_norms.dtype} {tuple(req.max_norms.shape)} on "
            f"{req.max_norms.device}"
        )
    with _on(plan.device):
        return _norm_pass(plan, req)


def _norm_pass(plan: Plan, req: Request) -> Pass1:
    norm_k, _, chunk, tl_dtype = _kernels()
    kind = norm_k.norm_kind(req.norm_type)
    f64 = dict(dtype=torch.float64, device=plan.device)
    partials = torch.empty(2 * max(plan.num_chunks, 1), **f64)
    p_bits = _f64_bits(req.norm_type if math.isfinite(req.norm_type) else 0.0)
    for g in plan.groups:
        plain = kind in (norm_k.KIND_ONE, norm_k.KIND_TWO) and g.dtype != torch.float64
        norm_k.chunk_partials[(g.chunk_hi - g.chunk_lo,)](
            plan.table, plan.num_tensors, g.chunk_lo, partials, p_bits,
            DT=tl_dtype[g.dtype], KIND=kind, PLAIN=plain, ALIGNED=g.aligned,
            CHUNK=chunk, BLOCK=norm_k.BLOCK, num_warps=_NUM_WARPS,
        )
    norm = torch.empty((), **f64)
    coef = torch.empty((), **f64)
    out = torch.empty((), dtype=req.out_dtype, device=plan.device)
    unscale = req.inv_scale is not None
    # Pointers a variant never touches (its flags are compile-time constants) get a stand-in.
    inv_ptr = req.inv_scale if unscale else partials
    found_ptr = req.found_inf if req.found_inf is not None else partials
    max_norm_bits = _f64_bits(req.max_norm)
    if req.totals:
        norm_k.finish[(1,)](
            partials, plan.num_chunks, p_bits, max_norm_bits, norm, coef, out, inv_ptr,
            found_ptr, KIND=kind, OUT_DT=tl_dtype[req.out_dtype], FBLOCK=norm_k.FBLOCK,
            UNSCALE=unscale, FLAG=req.found_inf is not None, MODE=int(req.soft),
            num_warps=_NUM_WARPS,
        )
    coefs_wanted = req.max_norms is not None or req.per_tensor_coef
    n = plan.num_tensors
    per = torch.empty(n if req.per_tensor or coefs_wanted else 0, **f64)
    per_coef = torch.empty(n if coefs_wanted else 0, **f64)
    if per.numel():
        norm_k.per_tensor_norms[(n,)](
            plan.table, n, partials, p_bits, per, inv_ptr,
            req.max_norms if req.max_norms is not None else partials,
            per_coef if coefs_wanted else partials, max_norm_bits,
            _f64_bits(req.adaptive[0] if req.adaptive else 0.0),
            _f64_bits(req.adaptive[1] if req.adaptive else 1.0),
            KIND=kind, CHUNK=chunk, FBLOCK=norm_k.FBLOCK, UNSCALE=unscale,
            COEF=(2 if req.max_norms is not None else 1) if coefs_wanted else 0,
            MODE=2 if req.adaptive else int(req.soft), num_warps=4,
        )
    return Pass1(norm, coef, out, per if req.per_tensor or coefs_wanted else per[:0], per_coef)


def scale_pass(plan: Plan, coef: Tensor, per_tensor: bool = False) -> None:
    """Pass 2: every tensor times ``coef`` (fp64 0-dim on the device), or with ``per_tensor``
    tensor t times ``coef[t]``, in place."""
    count = plan.num_tensors if per_tensor else 1
    if coef.dtype != torch.float64 or coef.numel() != count or coef.device != plan.device:
        raise RuntimeError(
            f"coef must be {count} float64 element(s) on {plan.device}, got {coef.dtype} "
            f"{tuple(coef.shape)} on {coef.device}"
        )
    norm_k, scale_k, chunk, tl_dtype = _kernels()
    with _on(plan.device):
        for g in plan.groups:
            scale_k.scale[(g.chunk_hi - g.chunk_lo,)](
                plan.table, plan.num_tensors, g.chunk_lo, coef,
                DT=tl_dtype[g.dtype], ALIGNED=g.aligned, CHUNK=chunk, BLOCK=norm_k.BLOCK,
                PER_TENSOR=per_tensor, num_warps=_NUM_WARPS,
            )


def clamp_pass(plan: Plan, clip_value: float, cuda_rule: bool | None = None) -> None:
    """Value clipping: every element clamped to [-clip_value, clip_value] in place, the bound
    rounded to each group's dtype as torch rounds a Python bound, bitwise as torch's kernels on
    the plan's device (``cuda_rule``: force the CUDA ones' zero signs, for tests)."""
    if not clip_value >= 0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    norm_k, scale_k, chunk, tl_dtype = _kernels()
    with _on(plan.device):
        for g in plan.groups:
            bound = float(torch.tensor(clip_value, dtype=g.dtype))
            scale_k.clamp[(g.chunk_hi - g.chunk_lo,)](
                plan.table, plan.num_tensors, g.chunk_lo, _f64_bits(bound), _f64_bits(-bound),
                DT=tl_dtype[g.dtype], ALIGNED=g.aligned, CHUNK=chunk, BLOCK=norm_k.BLOCK,
                CUDA_RULE=plan.device.type == "cuda" if cuda_rule is None else cuda_rule,
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
    soft: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    r = norm_pass(plan_for(tensors), Request(norm_type, max_norm, per_tensor, torch.float64,
                                             inv_scale, found_inf, soft))
    return r.norm, r.coef, r.per_tensor


@_total_norm_op.register_fake
def _(tensors, norm_type, max_norm, per_tensor, inv_scale=None, found_inf=None, soft=False):
    return norm_outputs_like(tensors, per_tensor)


@torch.library.custom_op("fusedclip::triton_clip_", mutates_args=("tensors", "found_inf"))
def _clip_op(
    tensors: list[Tensor],
    max_norm: float,
    norm_type: float,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> Tensor:
    plan = plan_for(tensors)
    r = norm_pass(plan, Request(norm_type, max_norm, False, torch.float64, inv_scale, found_inf,
                                soft))
    scale_pass(plan, r.coef)
    return r.norm


@_clip_op.register_fake
def _(tensors, max_norm, norm_type, inv_scale=None, found_inf=None, soft=False):
    return norm_outputs_like(tensors, False)[0]


@torch.library.custom_op("fusedclip::triton_clip_per_tensor_", mutates_args=("tensors",))
def _clip_per_tensor_op(
    tensors: list[Tensor], max_norms: Tensor, norm_type: float, soft: bool
) -> Tensor:
    plan = plan_for(tensors)
    r = norm_pass(plan, Request(norm_type, soft=soft, max_norms=max_norms, totals=False))
    scale_pass(plan, r.per_tensor_coef, per_tensor=True)
    return r.per_tensor


@_clip_per_tensor_op.register_fake
def _(tensors, max_norms, norm_type, soft):
    return norm_outputs_like(tensors, True)[2]


@torch.library.custom_op("fusedclip::triton_adaptive_clip_", mutates_args=("grads",))
def _adaptive_clip_op(
    grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float, norm_type: float
) -> None:
    if len(grads) != len(params):
        raise ValueError(f"{len(grads)} gradients but {len(params)} parameters")
    if not (clip_factor >= 0 and eps >= 0):
        raise ValueError(f"clip_factor and eps must be >= 0, got {clip_factor} and {eps}")
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.shape != p.shape or not (g.is_contiguous() and p.is_contiguous()):
            raise ValueError(f"gradient {i} and its parameter must have one shape and be "
                             "contiguous (units are rows in memory order)")
    if not any(g.numel() for g in grads):
        return
    grad_plan, param_plan = plan_for(grads, units=True), plan_for(params, units=True)
    of_params = norm_pass(param_plan, Request(norm_type, per_tensor=True, totals=False))
    of_grads = norm_pass(grad_plan, Request(norm_type, max_norms=of_params.per_tensor,
                                            adaptive=(eps, clip_factor), totals=False))
    scale_pass(grad_plan, of_grads.per_tensor_coef, per_tensor=True)


@_adaptive_clip_op.register_fake
def _(grads, params, clip_factor, eps, norm_type):
    return None


@torch.library.custom_op("fusedclip::triton_scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[Tensor], coef: Tensor) -> None:
    scale_pass(plan_for(tensors), coef)


@_scale_op.register_fake
def _(tensors, coef):
    return None


@torch.library.custom_op("fusedclip::triton_clamp_", mutates_args=("tensors",))
def _clamp_op(tensors: list[Tensor], clip_value: float) -> None:
    clamp_pass(plan_for(tensors), clip_value)


@_clamp_op.register_fake
def _(tensors, clip_value):
    return None


# ---- the backend interface (fusedclip.reference's) ---------------------------------------------

_OPS = FusedOps(
    "triton",
    norm=_total_norm_op,
    clip=_clip_op,
    scale=_scale_op,
    clip_per_tensor=_clip_per_tensor_op,
    clamp=_clamp_op,
    adaptive_clip=_adaptive_clip_op,
    check_device=_check_device,
)
total_norm = _OPS.total_norm
scale_ = _OPS.scale_
clip_with_norm_ = _OPS.clip_with_norm_
clip_ = _OPS.clip_
clip_per_tensor_ = _OPS.clip_per_tensor_
clip_stats_ = _OPS.clip_stats_
clamp_ = _OPS.clamp_
adaptive_clip_ = _OPS.adaptive_clip_


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


def _params_pass1(params, max_norm, norm_type, cuda_only, inv_scale, found_inf, soft, writing):
    plan = _params_plan(params, cuda_only, writing, inv_scale is not None)
    if plan is None:
        return None, None
    r = norm_pass(plan, Request(norm_type, max_norm, False, plan.result_dtype, inv_scale,
                                found_inf, soft))
    return plan, r


def clip_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> Tensor | None:
    """``clip_grad_norm_`` on ``params`` with the plan of ``fusedclip._C`` (its C++ loop over the
    ``.grad``s and its cache) and these kernels; the norm in torch's dtype, or None when
    ``fusedclip._C`` is not built or some gradient needs the general path. ``inv_scale`` and
    ``found_inf``: the AMP path; ``soft``: the soft coefficient."""
    plan, r = _params_pass1(params, max_norm, norm_type, cuda_only, inv_scale, found_inf, soft,
                            True)
    if plan is None:
        return None
    scale_pass(plan, r.coef)
    return r.out


def norm_params(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    *,
    cuda_only: bool = True,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> tuple[Tensor, Tensor] | None:
    """Pass 1 of ``clip_params`` alone: (norm in torch's dtype, fp64 factor), or None."""
    plan, r = _params_pass1(params, max_norm, norm_type, cuda_only, inv_scale, found_inf, soft,
                            False)
    return None if plan is None else (r.out, r.coef)
