"""Public functions: drop-in replacements for ``torch.nn.utils``' gradient clipping.

Each takes torch's arguments in torch's order and returns what torch returns, plus the keyword-only
``backend=`` (``None``/``"auto"``, ``"cpp"``, ``"triton"``, ``"reference"``; see
``fusedclip._select``). Each validates its arguments, chooses a backend once and hands the work to
it (``fusedclip.backends.Backend``). ``foreach`` is accepted for compatibility and has no effect:
the fused backends already handle all tensors of a device and dtype group in one launch per pass,
and the reference is a loop.

Every ``norm_type`` torch takes is taken: p > 0 and inf by the backends' passes, and 0, negative
p and -inf by ``fusedclip.backends._math.general_norm`` (then the backend scales); NaN, for which
torch returns a NaN norm and writes NaN into the gradients, is refused.

Differences from torch, all deliberate (README.md "Different from torch"):

* The norm is accumulated in fp64 and the clip coefficient is computed from that unrounded norm,
  and the norm is returned in the gradients' dtypes promoted with float32 (torch: in the
  gradients' dtype, so a bf16 norm reads 83.0 for 82.83 and an fp16 norm above 65504 is inf,
  which zeroes the gradients).
* A negative or NaN ``max_norm``/``clip_value``, and a NaN ``norm_type``, raise ``ValueError``
  instead of silently flipping, pinning or poisoning the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fusedclip import _select, amp, distributed
from fusedclip._args import (
    TensorOrTensors,
    as_norm_type,
    as_pass_norm_type,
    as_soft,
    as_stats_request,
    as_threshold,
    as_thresholds,
    as_total_norm,
    check_dense_real_grads,
    check_disjoint,
    check_grad_dtypes,
    check_tensor_items,
    check_writable_grads,
    collect_tensors,
    grads_of,
    norm_result_dtype,
    raise_if_nonfinite,
)
from fusedclip.backends._math import clip_coef, general_norm, kernels_take_norm_type
from fusedclip.stats import ClipStats

__all__ = [
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The norm of ``tensors`` viewed as one vector (like ``torch.nn.utils.get_total_norm``).

    Returns a 0-dim tensor on the first tensor's device, of the tensors' dtypes promoted with
    float32; ``tensor(0.)`` on the CPU when ``tensors`` is empty. With ``process_group``
    (``fusedclip.distributed``) the norm is over the tensors of every rank of the group (every
    rank must call it; one with no tensors gets an fp32 norm on the group's device). DTensors are
    reduced over the mesh dimensions that shard them, and the norm is then a DTensor replicated
    over their mesh, as torch returns it.
    """
    items = collect_tensors(tensors, name="tensors")
    p = as_norm_type(norm_type)
    choice = _select.parse(backend)
    if process_group is not None or distributed.has_dtensor(items):
        _refuse_general_norm_type(p, "process_group= and DTensor gradients")
        local = distributed.local_shards(items, "tensors")
        norm, _, result_dtype = _spread_norm(local, p, choice, process_group)
        norm = norm.to(result_dtype)
        if error_if_nonfinite:
            raise_if_nonfinite(norm, p)
        return distributed.wrap_norm(norm, local.mesh)
    if not items:
        return torch.tensor(0.0)
    check_grad_dtypes(items, "tensors")
    check_disjoint(items, "tensors")
    impl = _select.select(choice, items)
    norm = impl.total_norm(items, p) if kernels_take_norm_type(p) else general_norm(items, p)
    norm = norm.to(norm_result_dtype(items))
    if error_if_nonfinite:
        raise_if_nonfinite(norm, p)
    return norm


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor | float,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Scale gradients in place by ``min(1, max_norm / (total_norm + 1e-6))``."""
    grads = _local_grads(collect_tensors(parameters, name="parameters"))
    limit = as_threshold(max_norm, "max_norm")
    norm = as_total_norm(distributed.full(total_norm))
    choice = _select.parse(backend)
    if grads:
        check_writable_grads(grads)
        _select.select(choice, grads).clip_with_norm_(grads, limit, norm)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    mode: str = "hard",
    return_stats: bool | str = False,
    scaler: torch.amp.GradScaler | None = None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    fold_into_optimizer: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor | ClipStats:
    """Clip the global gradient norm in place; returns the norm before clipping.

    Gradients are scaled by ``min(1, max_norm / (total_norm + 1e-6))`` where ``total_norm`` is the
    ``norm_type``-norm of all gradients as if concatenated. With ``error_if_nonfinite=True`` a NaN
    or infinite norm raises (after one host synchronization) and leaves the gradients untouched.

    ``mode="soft"`` scales by ``max_norm / (total_norm + max_norm)`` instead: below 1 for every
    positive norm, smooth in it, and near 1 for norms far under ``max_norm``.

    ``return_stats=True`` returns a ``fusedclip.stats.ClipStats`` of device tensors (the norm, the
    coefficient, whether it clipped, whether the norm was finite) instead of the bare norm, with no
    host synchronization; ``return_stats="per_tensor"`` adds every gradient's own norm, from the
    same read. ``fusedclip.stats.StatsWindow`` turns them into logger dicts.

    AMP (``fusedclip.amp``; README.md "AMP"): with ``scaler=`` (a ``torch.amp.GradScaler``) and
    ``optimizer=`` (one optimizer or a list) the call replaces ``scaler.unscale_(optimizer)`` and
    the clip, returns the norm of the unscaled gradients and leaves the scaler as ``unscale_``
    does, so ``scaler.step`` and ``scaler.update`` follow as usual. fp16 gradients are refused, as
    ``unscale_`` refuses them; with ``error_if_nonfinite=True`` the gradients are unscaled (not
    clipped) before the error, as in torch's recipe. ``fold_into_optimizer=True`` (torch's fused
    Adam/AdamW/SGD/Adagrad) leaves the gradients as they are and hands the factor to the
    optimizer's next step (its ``grad_scale``).

    ``process_group`` (``fusedclip.distributed``): the gradients are this rank's share of a model
    spread over the group (tensor or pipeline parallel); the norm is over every rank's gradients,
    from one all-reduce of two values, and each rank clips its own. Every rank of the group must
    call it, those without gradients too.
    """
    params = collect_tensors(
        parameters, name="parameters", warn_empty_generator=True, check_items=False
    )
    limit = as_threshold(max_norm, "max_norm")
    p = as_norm_type(norm_type)
    soft = as_soft(mode)
    per_tensor = as_stats_request(return_stats)
    choice = _select.parse(backend)
    amp_call = scaler is not None or optimizer is not None or fold_into_optimizer
    _check_options(amp_call, bool(return_stats), process_group, scaler, fold_into_optimizer)
    if amp_call or process_group is not None:
        _refuse_general_norm_type(p, "scaler=, fold_into_optimizer= and process_group=")

    if amp_call:
        check_tensor_items(params, "parameters")
        if distributed.has_dtensor(grads_of(params)):
            raise ValueError(_SPREAD_OPTIONS.format("DTensor gradients"))
        norm = amp.clip_grad_norm_scaled_(params, limit, p, error_if_nonfinite, scaler, optimizer,
                                          fold_into_optimizer, choice, soft)
        if norm is not None:
            return norm  # (None: a disabled scaler, nothing to unscale: clip as usual)
    if not (error_if_nonfinite or per_tensor or process_group is not None
            or torch.compiler.is_compiling() or not kernels_take_norm_type(p)):
        done = _clip_params(params, limit, p, soft, choice, bool(return_stats))
        if done is not None:
            return done
    check_tensor_items(params, "parameters")
    grads = grads_of(params)
    if process_group is not None or distributed.has_dtensor(grads):
        if return_stats:
            raise ValueError(_SPREAD_OPTIONS.format("DTensor gradients"))
        _refuse_general_norm_type(p, "DTensor gradients")
        return _spread_clip(grads, limit, p, error_if_nonfinite, choice, soft, process_group)
    return _local_clip(grads, limit, p, error_if_nonfinite, choice, soft, return_stats,
                       per_tensor)


_SPREAD_OPTIONS = ("scaler=, optimizer=, fold_into_optimizer= and return_stats= are not "
                   "available with {} yet")


def _check_options(amp_call: bool, return_stats: bool, process_group: object, scaler: object,
                   fold_into_optimizer: bool) -> None:
    """The combinations of ``clip_grad_norm_``'s options that are refused, before any work."""
    if process_group is not None and (amp_call or return_stats):
        raise ValueError(_SPREAD_OPTIONS.format("process_group="))
    if amp_call and scaler is None and not fold_into_optimizer:
        raise ValueError("optimizer= is for scaler= or fold_into_optimizer=True")
    if amp_call and return_stats:
        raise ValueError("return_stats is not available with scaler= or fold_into_optimizer=")


def _refuse_general_norm_type(p: float, what: str) -> None:
    """0, negative p and -inf are computed on the general path alone, which ``what`` does not
    take yet: a clear error before anything is touched."""
    if not kernels_take_norm_type(p):
        raise ValueError(f"norm_type={p} is not available with {what} yet (there: p > 0 or inf); "
                         "without them every norm type torch takes is")


def _clip_params(params, limit, p, soft, choice, stats) -> Tensor | ClipStats | None:
    """The one-call path: one C++ call reads the ``.grad``s and reuses the cached plan, then both
    passes launch; the norm, or with ``stats`` its ``ClipStats``. None when there is none, or some
    gradient needs the general path (which validates everything)."""
    fast = _select.fast_path(choice)
    if fast is None:
        return None
    impl, cuda_only = fast
    if not stats:
        return impl.clip_params(params, limit, p, cuda_only=cuda_only, soft=soft)
    done = impl.clip_stats_params(params, limit, p, cuda_only=cuda_only, soft=soft)
    if done is None:
        return None
    out, coef, norm = done
    return ClipStats.of(norm, coef, out.dtype)


def _local_clip(grads, limit, p, error_if_nonfinite, choice, soft, return_stats,
                per_tensor) -> Tensor | ClipStats:
    """``clip_grad_norm_`` over plain gradients (of any devices) by the selected backend."""
    if not grads:
        norm = torch.tensor(0.0)
        if not return_stats:
            return norm
        return ClipStats.of(norm, torch.tensor(1.0, dtype=torch.float64), norm.dtype,
                            torch.zeros(0, dtype=torch.float64) if per_tensor else None)
    check_writable_grads(grads)
    impl = _select.select(choice, grads)
    result_dtype = norm_result_dtype(grads)
    if not kernels_take_norm_type(p):
        return _general_clip(impl, grads, limit, p, error_if_nonfinite, soft, return_stats,
                             per_tensor, result_dtype)
    if error_if_nonfinite:
        # As torch, the norm as returned is tested (fp32 or wider: an fp16 model's norm past 65504
        # is finite here, where torch's is inf).
        norm = impl.total_norm(grads, p)
        raise_if_nonfinite(norm.to(result_dtype), p)
        if not return_stats:
            impl.clip_with_norm_(grads, limit, norm, soft)
            return norm.to(result_dtype)
    if return_stats:
        norm, coef, per = impl.clip_stats_(grads, limit, p, soft, per_tensor)
        return ClipStats.of(norm, coef, result_dtype, per)
    return impl.clip_(grads, limit, p, soft=soft).to(result_dtype)


def _general_clip(impl, grads, limit, p, error_if_nonfinite, soft, return_stats, per_tensor,
                  result_dtype) -> Tensor | ClipStats:
    """``_local_clip`` for the norm types the passes do not compute: the norm on the general path,
    then the backend's scale."""
    norm = general_norm(grads, p)
    if error_if_nonfinite:
        raise_if_nonfinite(norm.to(result_dtype), p)
    per = None
    if return_stats and per_tensor:  # before the gradients change
        per = torch.stack([general_norm([g], p).to(norm.device) for g in grads])
    coef = clip_coef(limit, norm, soft)
    impl.scale_(grads, coef)
    if return_stats:
        return ClipStats.of(norm, coef, result_dtype, per)
    return norm.to(result_dtype)


def _spread_norm(local: distributed.Local, p, choice, group):
    """(global fp64 norm, backend or None, the dtype it is returned in) of ``local``'s tensors over
    their meshes and ``group``; a rank without tensors contributes a zero norm."""
    distributed.check_group(local, group)
    tensors = local.tensors
    if not tensors:
        device = distributed.group_device(group, None)
        return distributed.sharded_norm(local, p, None, group, device), None, torch.float32
    check_grad_dtypes(tensors, "tensors")
    check_disjoint(tensors, "tensors")
    impl = _select.select(choice, tensors)
    norm = distributed.sharded_norm(local, p, lambda ts: impl.total_norm(ts, p), group,
                                    tensors[0].device)
    return norm, impl, norm_result_dtype(tensors)


def _spread_clip(grads, limit, p, error_if_nonfinite, choice, soft, group) -> Tensor:
    """``clip_grad_norm_`` over DTensor gradients and/or the ranks of ``group``."""
    local = distributed.local_shards(grads)
    if local.tensors:
        check_writable_grads(local.tensors)
    norm, impl, result_dtype = _spread_norm(local, p, choice, group)
    if error_if_nonfinite:
        raise_if_nonfinite(norm.to(result_dtype), p)
    if impl is not None:
        impl.scale_(local.tensors, clip_coef(limit, norm, soft))
    return distributed.wrap_norm(norm.to(result_dtype), local.mesh)


def _local_grads(params: list[Tensor]) -> list[Tensor]:
    """The gradients of ``params``, DTensors as their local shards: for the element-wise clips."""
    grads = grads_of(params)
    return distributed.local_shards(grads).tensors if distributed.has_dtensor(grads) else grads


@torch.no_grad()
def clip_grad_norm_per_tensor_(
    parameters: TensorOrTensors,
    max_norm: float | Sequence[float] | Tensor,
    norm_type: float = 2.0,
    *,
    mode: str = "hard",
    backend: str | None = None,
) -> Tensor:
    """Clip every gradient to its own norm threshold, in place (layer-wise clipping).

    ``max_norm`` is one threshold for all, or one per parameter that has a gradient (a sequence or
    a 1-D tensor, read on the host). Gradient i is scaled by ``min(1, max_norm[i] / (norm_i +
    1e-6))`` (``mode="soft"``: ``max_norm[i] / (norm_i + max_norm[i])``), in the same two passes
    as global clipping. Returns the per-gradient norms before clipping, a 1-D tensor on the first
    gradient's device, in the gradients' dtypes promoted with float32 (empty, on the CPU, when there
    are no gradients).
    """
    grads = grads_of(collect_tensors(parameters, name="parameters"))
    p = as_pass_norm_type(norm_type, "clip_grad_norm_per_tensor_")
    soft = as_soft(mode)
    limits = as_thresholds(max_norm, len(grads))
    choice = _select.parse(backend)
    distributed.refuse_dtensors(grads, "clip_grad_norm_per_tensor_")
    if not grads:
        return torch.zeros(0)
    check_writable_grads(grads)
    norms = _select.select(choice, grads).clip_per_tensor_(grads, limits, p, soft)
    return norms.to(norm_result_dtype(grads))


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: TensorOrTensors,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
    *,
    backend: str | None = None,
) -> None:
    """Adaptive gradient clipping (NFNets), with the semantics of timm's ``adaptive_clip_grad``.

    For every parameter with a gradient, each unit (a row: all dims but the first, or the whole
    tensor below two dims) of the gradient whose norm reaches ``clip_factor * max(norm of the
    parameter's unit, eps)`` is scaled down to that norm; the other units are untouched. The fused
    backends read each parameter and each gradient once and write only the clipped units; norms
    are accumulated in fp64 (timm's are in the parameters' dtype). Gradients must be dense and
    real (a ``TypeError`` otherwise); the parameters, only read, may share memory.
    """
    params = [p for p in collect_tensors(parameters, name="parameters") if p.grad is not None]
    factor = as_threshold(clip_factor, "clip_factor")
    floor = as_threshold(eps, "eps")
    p = as_pass_norm_type(norm_type, "adaptive_clip_grad_")
    choice = _select.parse(backend)
    if not params:
        return
    grads = grads_of(params)  # torch keeps every gradient the shape of its parameter
    distributed.refuse_dtensors(grads, "adaptive_clip_grad_")
    check_writable_grads(grads)
    check_dense_real_grads(grads, "adaptive_clip_grad_")
    _select.select(choice, grads).adaptive_clip_(grads, [q.detach() for q in params], factor,
                                                 floor, p)


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place (DTensors: their
    local shards).

    The bound is rounded to each gradient's dtype as torch rounds it; a ``clip_value`` past a
    dtype's range (1e5 for fp16) becomes inf there and clamps nothing of those gradients, where
    torch raises ("cannot be converted to type c10::Half without overflow")."""
    params = collect_tensors(parameters, name="parameters")
    limit = as_threshold(clip_value, "clip_value")
    choice = _select.parse(backend)
    fast = None if torch.compiler.is_compiling() else _select.fast_path(choice)
    if fast is not None and fast[0].clamp_params(params, limit, cuda_only=fast[1]):
        return  # the one-call path: the .grads read in C++, the cached plan
    grads = _local_grads(params)
    if grads:
        check_writable_grads(grads)
        check_dense_real_grads(grads, "clip_grad_value_")
        _select.select(choice, grads).clamp_(grads, limit)
