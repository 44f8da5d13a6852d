"""The ``triton`` backend: the two passes of the fused clip as Triton kernels.

Same table and arithmetic as the C++ engine (csrc/engine/table.h, csrc/engine/norm_math.h): pass 1
writes one (max, scaled sum) partial per 64Ki-element chunk, a one-program follow-up combines them
in a fixed order into the norm and the clip coefficient on the device, and pass 2 rescales in place
unless the coefficient is exactly 1. No host synchronization, no per-tensor launches: one launch per
(dtype, 16-byte alignment) group and pass.

Plans (the device-side table) come from ``plan.py``, built in Python and cached; when
``fusedclip._C`` is built, ``clip_grad_norm_(..., backend="triton")`` takes its C++ plan instead
(``BACKEND.clip_params``): the ``.grad``s are read and checked in C++ and only the launches are
Python.

Kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
Triton was first imported (that is how CI tests their logic). The operators
(``torch.ops.fusedclip.triton_<op>``, the schemas of the ``cpp`` ones) are registered with
``torch.library.custom_op`` (opaque to ``torch.compile``, with fake implementations): the kernels
read pointers out of a table, which the compiler could not trace through ``triton_op``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import struct

import torch
from torch import Tensor

from fusedclip.backends import BackendStatus
from fusedclip.backends._multi_tensor import FusedBackend, Operators
from fusedclip.backends._schema import custom_op, register_fakes
from fusedclip.backends.triton import plan as plans
from fusedclip.backends.triton.plan import CHUNK, Plan

__all__ = ["BACKEND", "NAME", "Request", "Variant", "clamp_pass", "finish_partials",
           "interpreting", "norm_pass", "scale_pass", "status", "variant"]

NAME = "triton"
_NUM_WARPS = 8  # the finish's and the scaled pair's


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the streaming kernels (pass 1's p = 1, 2, inf and pass 2) are compiled and launched,
    chosen at run time by ``FUSEDCLIP_TRITON_VARIANT`` (comma-separated ``key=value``, e.g.
    ``tile=16384,depth=2,warps=8,maxnreg=64,persist=4``) so a device run can sweep them without a
    rebuild; each distinct value compiles its own kernels once. ``tile``: bytes per tile (a power
    of two, at least 16 per thread); ``depth``: tiles whose loads are issued before the first is
    used (1 or 2); ``warps``: warps per program; ``maxnreg``: the register cap given to ptxas (0:
    none);
    ``persist``: pass 2's programs per SM, each walking every grid-th chunk (0: one program per
    chunk).

    The default was read off the compiled sm_90 code (docs/performance.md): 8 KiB tiles two deep
    give every thread four 16-byte loads in flight; ptxas keeps them in flight only when given a
    register cap (without one it sinks each load to its use), and 64 registers fit 4 programs of 8
    warps per SM, 64 KiB of reads in flight per SM. Pass 2 is persistent, 4 programs per SM (what
    64 registers allow): with a coefficient of 1 that is one load and an exit per program, against
    one program per 64Ki-element chunk."""

    tile: int = 8192
    depth: int = 2
    warps: int = 8
    maxnreg: int = 64
    persist: int = 4

    def block(self, dtype: torch.dtype) -> int:
        return self.tile // dtype.itemsize

    def vec(self, dtype: torch.dtype) -> int:
        """Elements per 16-byte vector."""
        return 16 // dtype.itemsize

    def programs(self, chunks: int, device: torch.device) -> int:
        """Pass 2's grid for ``chunks`` chunks on ``device`` (the interpreter counts one SM)."""
        if not self.persist:
            return chunks
        return min(chunks, self.persist * _sm_count(device))

    def launch(self) -> dict:
        # Not to the interpreter: some Triton versions' interpreters pass an option they do not
        # know (maxnreg) on to the kernel as an argument.
        cap = self.maxnreg and not interpreting()
        return {"num_warps": self.warps, **({"maxnreg": self.maxnreg} if cap else {})}


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _parse_variant(text: str) -> Variant:
    fields = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        if key not in Variant.__dataclass_fields__ or not value.strip().isdigit():
            raise ValueError(f"FUSEDCLIP_TRITON_VARIANT: expected key=integer with key among "
                             f"{', '.join(Variant.__dataclass_fields__)}, got {item!r}")
        fields[key] = int(value)
    v = Variant(**fields)
    if v.tile & (v.tile - 1) or v.tile < 16 * 32 * v.warps or v.depth not in (1, 2) \
            or v.warps & (v.warps - 1) or not 0 <= v.maxnreg <= 255 or v.persist < 0:
        raise ValueError(f"FUSEDCLIP_TRITON_VARIANT: unsupported {v}")
    return v


def variant() -> Variant:
    """The streaming kernels' variant: ``FUSEDCLIP_TRITON_VARIANT``, read at each call."""
    return _parse_variant(os.environ.get("FUSEDCLIP_TRITON_VARIANT", ""))


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed")
    from importlib.metadata import version

    installed = f"triton {version('triton')}"
    if interpreting():
        return BackendStatus(True, f"{installed}, TRITON_INTERPRET=1: kernels run on CPU tensors "
                             "in the interpreter", ("cpu",))
    if torch.cuda.is_available():
        return BackendStatus(True, f"{installed}: CUDA tensors", ("cuda",))
    return BackendStatus(
        False,
        f"{installed} is installed, but no CUDA device is visible (TRITON_INTERPRET=1 runs the "
        "kernels on CPU tensors in Triton's interpreter)",
    )


@dataclasses.dataclass(frozen=True)
class _Kernels:
    pair: object
    norm: object
    finish: object
    scale: object
    dtypes: dict


@functools.cache
def _kernels() -> _Kernels:
    # Imported on first use: importing Triton is slow, and TRITON_INTERPRET must be set before.
    import triton.language as tl

    from fusedclip.triton_kernels import finish, norm, pair, scale

    dtypes = {torch.float32: tl.float32, torch.float64: tl.float64,
              torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    return _Kernels(pair, norm, finish, scale, dtypes)


def _f64_bits(x: float) -> int:
    """An fp64 value as the int64 with its bits: Triton passes Python floats as fp32."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_args(norm_type: float, max_norm: float) -> None:
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")


def _check_scalar(t: Tensor | None, dtype: torch.dtype, device: torch.device, name: str,
                  count: int = 1) -> None:
    """A tensor argument read by the kernels (csrc/engine/checks.h check_scalar_arg's rules and
    messages)."""
    if t is None:
        return
    if t.numel() != count:
        elements = "one element" if count == 1 else f"{count} elements (one per tensor)"
        raise RuntimeError(f"{name} must have {elements}, got {t.numel()}")
    if t.dtype != dtype:
        raise RuntimeError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}")
    if t.device != device:
        raise RuntimeError(f"{name} is on {t.device} but tensors[0] is on {device}")


@dataclasses.dataclass(frozen=True)
class Request:
    """What pass 1 computes (csrc/engine/request.h's NormRequest): the norm and coefficient, the
    norm in ``out_dtype``, per-tensor norms when ``per_tensor``; AMP: ``inv_scale`` and
    ``found_inf`` (see ``fusedclip.backends.Backend.total_norm``); ``soft`` coefficients;
    per-tensor clipping: one coefficient per tensor from ``max_norms`` (fp64, one per tensor) or,
    with ``per_tensor_coef``, from ``max_norm``; ``adaptive`` (AGC): the coefficients of adaptive
    clipping, ``max_norms`` being the parameters' unit norms."""

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
    partials_out: Tensor | None = None  # fp64 [T, 2]: each tensor's own (m, s) partial


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
    k = _kernels()
    norm_k, fin_k, tl_dtype = k.norm, k.finish, k.dtypes
    kind = k.pair.norm_kind(req.norm_type)
    f64 = dict(dtype=torch.float64, device=plan.device)
    partials = torch.empty(2 * max(plan.num_chunks, 1), **f64)
    p_bits = _f64_bits(req.norm_type if math.isfinite(req.norm_type) else 0.0)
    v = variant()
    for g in plan.groups:
        plain = kind in (k.pair.KIND_ONE, k.pair.KIND_TWO) and g.dtype != torch.float64
        fast = plain or kind == k.pair.KIND_INF  # see norm.chunk_partials
        norm_k.chunk_partials[(g.chunk_hi - g.chunk_lo,)](
            plan.table, plan.num_tensors, g.chunk_lo, partials, p_bits,
            DT=tl_dtype[g.dtype], KIND=kind, PLAIN=plain, ALIGNED=g.aligned, CHUNK=CHUNK,
            BLOCK=v.block(g.dtype) if fast else norm_k.BLOCK, VEC=v.vec(g.dtype),
            DEPTH=v.depth, **(v.launch() if fast else {"num_warps": _NUM_WARPS}),
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
        fin_k.finish[(1,)](
            partials, plan.num_chunks, p_bits, max_norm_bits, norm, coef, out, inv_ptr,
            found_ptr, KIND=kind, OUT_DT=tl_dtype[req.out_dtype], FBLOCK=fin_k.FBLOCK,
            UNSCALE=unscale, FLAG=req.found_inf is not None, MODE=int(req.soft),
            num_warps=_NUM_WARPS,
        )
    coefs_wanted = req.max_norms is not None or req.per_tensor_coef
    n = plan.num_tensors
    per = torch.empty(n if req.per_tensor or coefs_wanted else 0, **f64)
    per_coef = torch.empty(n if coefs_wanted else 0, **f64)
    if per.numel():
        fin_k.per_tensor_norms[(n,)](
            plan.table, n, partials, p_bits, per, inv_ptr,
            req.max_norms if req.max_norms is not None else partials,
            per_coef if coefs_wanted else partials, max_norm_bits,
            _f64_bits(req.adaptive[0] if req.adaptive else 0.0),
            _f64_bits(req.adaptive[1] if req.adaptive else 1.0),
            KIND=kind, CHUNK=CHUNK, FBLOCK=fin_k.FBLOCK, UNSCALE=unscale,
            COEF=(2 if req.max_norms is not None else 1) if coefs_wanted else 0,
            MODE=2 if req.adaptive else int(req.soft), num_warps=4,
        )
    if req.partials_out is not None and n:
        fin_k.tensor_partials[(n,)](plan.table, n, partials, p_bits, req.partials_out,
                                     KIND=kind, CHUNK=CHUNK, FBLOCK=fin_k.FBLOCK, num_warps=4)
    return Pass1(norm, coef, out, per if req.per_tensor or coefs_wanted else per[:0], per_coef)


def finish_partials(partials: Tensor, req: Request) -> tuple[Tensor, Tensor]:
    """Pass 1's finish over partials made earlier (fp64 [N, 2], combined in row order): the
    fp64 norm and coefficient."""
    _check_args(req.norm_type, req.max_norm)
    _check_partials(partials, None, partials.device, "partials")
    _check_scalar(req.inv_scale, torch.float32, partials.device, "inv_scale")
    _check_scalar(req.found_inf, torch.float32, partials.device, "found_inf")
    k = _kernels()
    fin_k, tl_dtype = k.finish, k.dtypes
    f64 = dict(dtype=torch.float64, device=partials.device)
    norm, coef = torch.empty((), **f64), torch.empty((), **f64)
    unscale = req.inv_scale is not None
    with _on(partials.device):
        fin_k.finish[(1,)](
            partials, partials.shape[0],
            _f64_bits(req.norm_type if math.isfinite(req.norm_type) else 0.0),
            _f64_bits(req.max_norm), norm, coef, norm, req.inv_scale if unscale else partials,
            req.found_inf if req.found_inf is not None else partials,
            KIND=k.pair.norm_kind(req.norm_type), OUT_DT=tl_dtype[torch.float64],
            FBLOCK=fin_k.FBLOCK, UNSCALE=unscale, FLAG=req.found_inf is not None,
            MODE=int(req.soft), num_warps=_NUM_WARPS,
        )
    return norm, coef


def _check_partials(t: Tensor, rows: int | None, device: torch.device, name: str) -> None:
    """A partials tensor (csrc/engine/ops_impl.cpp check_partials' rules)."""
    if (t.dtype != torch.float64 or t.dim() != 2 or t.shape[1] != 2 or not t.is_contiguous()
            or (rows is not None and t.shape[0] != rows) or t.device != device):
        raise RuntimeError(f"{name} must be a contiguous float64 tensor of shape "
                           f"[{'N' if rows is None else rows}, 2] on {device}, got {t.dtype} "
                           f"{tuple(t.shape)} on {t.device}")


def scale_pass(plan: Plan, coef: Tensor, per_tensor: bool = False) -> None:
    """Pass 2: every tensor times ``coef`` (fp64 0-dim on the device), or with ``per_tensor``
    tensor t times ``coef[t]``, in place."""
    _check_scalar(coef, torch.float64, plan.device, "coef",
                  plan.num_tensors if per_tensor else 1)
    scale_k, tl_dtype = _kernels().scale, _kernels().dtypes
    v = variant()
    with _on(plan.device):
        for g in plan.groups:
            scale_k.scale[(v.programs(g.chunk_hi - g.chunk_lo, plan.device),)](
                plan.table, plan.num_tensors, g.chunk_lo, g.chunk_hi, coef,
                DT=tl_dtype[g.dtype], ALIGNED=g.aligned, CHUNK=CHUNK, BLOCK=v.block(g.dtype),
                PER_TENSOR=per_tensor, VEC=v.vec(g.dtype), DEPTH=v.depth, **v.launch(),
            )


def clamp_pass(plan: Plan, clip_value: float, cuda_rule: bool | None = None) -> None:
    """Value clipping: every element clamped to [-clip_value, clip_value] in place, the bound
    rounded to each group's dtype as torch rounds a Python bound (inf past the dtype's range:
    nothing clamped, where torch raises), bitwise as torch's kernels on
    the plan's device (``cuda_rule``: force the CUDA ones' zero signs, for tests)."""
    if not clip_value >= 0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    scale_k, tl_dtype = _kernels().scale, _kernels().dtypes
    v = variant()
    with _on(plan.device):
        for g in plan.groups:
            bound = float(torch.tensor(clip_value, dtype=g.dtype))
            scale_k.clamp[(g.chunk_hi - g.chunk_lo,)](
                plan.table, plan.num_tensors, g.chunk_lo, _f64_bits(bound), _f64_bits(-bound),
                DT=tl_dtype[g.dtype], ALIGNED=g.aligned, CHUNK=CHUNK, BLOCK=v.block(g.dtype),
                CUDA_RULE=plan.device.type == "cuda" if cuda_rule is None else cuda_rule,
                VEC=v.vec(g.dtype), DEPTH=v.depth, **v.launch(),
            )


# ---- operators: the schemas of csrc/ops.cpp, as fusedclip::triton_<op> ----------------------

@custom_op("fusedclip::triton_total_norm", mutates_args=("found_inf",))
def _total_norm_op(
    tensors: list[Tensor],
    norm_type: float,
    max_norm: float,
    per_tensor: bool,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    r = norm_pass(plans.plan_for(tensors), Request(norm_type, max_norm, per_tensor, torch.float64,
                                                   inv_scale, found_inf, soft))
    return r.norm, r.coef, r.per_tensor


@custom_op("fusedclip::triton_clip_", mutates_args=("tensors", "found_inf"))
def _clip_op(
    tensors: list[Tensor],
    max_norm: float,
    norm_type: float,
    per_tensor: bool,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> tuple[Tensor, Tensor]:
    plan = plans.plan_for(tensors)
    r = norm_pass(plan, Request(norm_type, max_norm, per_tensor, torch.float64, inv_scale,
                                found_inf, soft))
    scale_pass(plan, r.coef)
    return r.norm, r.per_tensor


@custom_op("fusedclip::triton_clip_per_tensor_", mutates_args=("tensors",))
def _clip_per_tensor_op(
    tensors: list[Tensor], max_norms: Tensor, norm_type: float, soft: bool
) -> Tensor:
    plan = plans.plan_for(tensors)
    r = norm_pass(plan, Request(norm_type, soft=soft, max_norms=max_norms, totals=False))
    scale_pass(plan, r.per_tensor_coef, per_tensor=True)
    return r.per_tensor


@custom_op("fusedclip::triton_adaptive_clip_", mutates_args=("grads",))
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
    grad_plan = plans.plan_for(grads, units=True)
    param_plan = plans.plan_for(params, units=True, written=False)  # only read: may overlap
    of_params = norm_pass(param_plan, Request(norm_type, per_tensor=True, totals=False))
    of_grads = norm_pass(grad_plan, Request(norm_type, max_norms=of_params.per_tensor,
                                            adaptive=(eps, clip_factor), totals=False))
    scale_pass(grad_plan, of_grads.per_tensor_coef, per_tensor=True)


@custom_op("fusedclip::triton_partials_", mutates_args=("out",))
def _partials_op(tensors: list[Tensor], norm_type: float, out: Tensor) -> None:
    if not tensors:
        return
    plan = plans.plan_for(tensors)
    _check_partials(out, len(tensors), plan.device, "out")
    norm_pass(plan, Request(norm_type, totals=False, partials_out=out))


@custom_op("fusedclip::triton_finish_partials", mutates_args=("found_inf",))
def _finish_partials_op(
    partials: Tensor,
    norm_type: float,
    max_norm: float,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    soft: bool = False,
) -> tuple[Tensor, Tensor]:
    return finish_partials(partials, Request(norm_type, max_norm, inv_scale=inv_scale,
                                             found_inf=found_inf, soft=soft))


@custom_op("fusedclip::triton_scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[Tensor], coef: Tensor) -> None:
    scale_pass(plans.plan_for(tensors), coef)


@custom_op("fusedclip::triton_clamp_", mutates_args=("tensors",))
def _clamp_op(tensors: list[Tensor], clip_value: float) -> None:
    clamp_pass(plans.plan_for(tensors), clip_value)


register_fakes("triton_")


# ---- the one-call path of clip_grad_norm_, on fusedclip._C's plan -----------------------------

def _run_params(params, max_norm, norm_type, cuda_only, inv_scale, found_inf, soft, scale):
    """The one-call path (``FusedBackend.clip_params``/``norm_params``) on the plan of
    ``fusedclip._C`` (its C++ loop over the ``.grad``s and its cache) with these kernels; None
    without ``fusedclip._C`` or when some gradient needs the general path."""
    plan = plans.of_params(params, cuda_only, scale, inv_scale is not None,
                           "cpu" if interpreting() else "cuda")
    if plan is None:
        return None
    r = norm_pass(plan, Request(norm_type, max_norm, False, plan.result_dtype, inv_scale,
                                found_inf, soft))
    if scale:
        scale_pass(plan, r.coef)
    return r.out, r.coef, r.norm


BACKEND = FusedBackend(
    NAME,
    Operators(norm=_total_norm_op, clip=_clip_op, scale=_scale_op,
              clip_per_tensor=_clip_per_tensor_op, clamp=_clamp_op,
              adaptive_clip=_adaptive_clip_op, partials=_partials_op,
              finish=_finish_partials_op),
    status, _run_params,
)
