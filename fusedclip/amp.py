"""The AMP path of ``clip_grad_norm_`` (``scaler=``, ``optimizer=``, ``fold_into_optimizer=``):
GradScaler-scaled gradients unscaled, checked for inf/NaN, measured and clipped in the two passes,
the scaler left as ``unscale_`` leaves it, and the fold of the factor into torch's fused optimizers
(``grad_scale`` / ``found_inf``). README.md "AMP: GradScaler and the optimizer fold" is the
account of what this does and why; the docstrings here say how.

This module reads GradScaler's per-optimizer state (``_per_optimizer_states``, ``OptState``,
``_scale``), private to torch but unchanged since torch 1.6; the tests run torch's own recipe
beside this one to catch a change.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.amp.grad_scaler import GradScaler, OptState

from fusedclip import _select
from fusedclip._args import (
    check_tensor_items,
    check_writable_grads,
    grads_of,
    norm_result_dtype,
    raise_if_nonfinite,
)
from fusedclip.backends._math import clip_coef, combine_norms
from fusedclip.backends._multi_tensor import by_device

__all__ = ["clip_grad_norm_scaled_"]

FP16_MESSAGE = (
    "Attempting to unscale FP16 gradients. (torch.amp.GradScaler refuses to, and so does "
    "fusedclip with scaler=: mixed precision keeps fp32 parameters. To unscale gradients of an "
    "fp16 model on purpose, call clip_grad_norm_ without scaler= on gradients you unscale "
    "yourself, or use the operators' inv_scale= argument.)"
)


def _optimizers(optimizer: object) -> list[torch.optim.Optimizer]:
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if optimizer is None:
        raise ValueError(
            "scaler= and fold_into_optimizer=True need optimizer=: the optimizer(s) whose "
            "gradients are unscaled or that take the factor"
        )
    if not isinstance(optimizer, Sequence) or not all(
        isinstance(o, torch.optim.Optimizer) for o in optimizer
    ):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer or a list of them, got "
            f"{type(optimizer).__name__}"
        )
    if len({id(o) for o in optimizer}) != len(optimizer):
        raise ValueError("optimizer lists the same optimizer twice")
    return list(optimizer)


def _owned_grads(optimizers: list[torch.optim.Optimizer], check_fp16: bool) -> list[list[Tensor]]:
    """Each optimizer's gradients in its parameter order, as ``GradScaler.unscale_`` visits them."""
    seen: set[int] = set()
    owned = []
    for opt in optimizers:
        grads = []
        for group in opt.param_groups:
            for param in group["params"]:
                g = param.grad
                if g is None:
                    continue
                if check_fp16 and g.dtype == torch.float16:
                    raise ValueError(FP16_MESSAGE)
                if id(g) in seen:
                    raise ValueError(
                        "a parameter appears twice among the optimizers' parameters: its "
                        "gradient would be unscaled twice"
                    )
                seen.add(id(g))
                grads.append(g)
        owned.append(grads)
    return owned


def _check_fold_optimizers(optimizers: list[torch.optim.Optimizer]) -> None:
    for opt in optimizers:
        fused = getattr(opt, "defaults", {}).get("fused")
        takes_attrs = getattr(opt, "_step_supports_amp_scaling", False) and (
            "grad_scaler" not in inspect.signature(opt.step).parameters
        )
        if not (fused and takes_attrs):
            raise ValueError(
                "fold_into_optimizer=True needs optimizers that read grad_scale and found_inf in "
                "their step (torch's Adam, AdamW, SGD or Adagrad with fused=True); got "
                f"{type(opt).__name__} with fused={fused!r}"
            )


def _check_fold_gradients(owned: list[list[Tensor]], clipped: list[Tensor]) -> None:
    clipped_ids = {id(g) for g in clipped}
    if sum(map(len, owned)) != len(clipped_ids) or not all(
        id(g) in clipped_ids for grads in owned for g in grads
    ):
        raise ValueError(
            "fold_into_optimizer=True needs parameters to have the same gradients as the "
            "optimizer(s): the optimizer divides all of its gradients by one factor"
        )


@dataclasses.dataclass(frozen=True)
class _Handover:
    """A factor handed to a fused optimizer's next step: what ``grad_scale`` was set to, the
    user's own ``grad_scale`` under it (None if there was none), and whether the step hook puts
    that back (without a scaler; with one, ``GradScaler.step`` deletes ``grad_scale`` itself)."""

    handed: Tensor
    base: Tensor | None
    restore: bool


def _hand_over_grad_scale(opt: torch.optim.Optimizer, grad_scale: Tensor, restore: bool) -> None:
    """``opt.grad_scale`` for its next step: the factor, times a ``grad_scale`` the user set (as
    ``GradScaler.step`` multiplies them). A factor an earlier call handed over and no step
    consumed (a skipped iteration, a step that raised) is replaced, never compounded."""
    current = getattr(opt, "grad_scale", None)
    pending = opt.__dict__.get("_fusedclip_handover")
    base = pending.base if pending is not None and current is pending.handed else current
    handed = grad_scale if base is None else base * grad_scale
    opt.grad_scale = handed
    opt._fusedclip_handover = _Handover(handed, base, restore)
    if not opt.__dict__.get("_fusedclip_step_hook"):
        # Registered once and never removed: removing a hook while the step runs its hooks
        # would mutate the dict torch is iterating.
        opt.register_step_post_hook(_after_step)
        opt._fusedclip_step_hook = True


def _after_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """After a step: the handed-over factor is consumed; without a scaler, the user's own
    ``grad_scale`` (or none) is put back."""
    pending = optimizer.__dict__.pop("_fusedclip_handover", None)
    if pending is None or not pending.restore:
        return
    if getattr(optimizer, "grad_scale", None) is pending.handed:
        if pending.base is None:
            del optimizer.grad_scale
        else:
            optimizer.grad_scale = pending.base


def _check_scaler(scaler: object) -> None:
    if not isinstance(scaler, GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    for name in ("unscale_", "_unscale_grads_"):
        if getattr(type(scaler), name) is not getattr(GradScaler, name):
            # Its own unscale_ would be skipped (FSDP's ShardedGradScaler all-reduces found_inf
            # across ranks there): refuse rather than leave the ranks disagreeing.
            raise TypeError(
                f"{type(scaler).__name__} overrides GradScaler.{name}, which fusedclip would "
                "skip; call scaler.unscale_(optimizer), then fusedclip.clip_grad_norm_ without "
                "scaler="
            )


def _scaler_state(scaler: GradScaler, opt: torch.optim.Optimizer) -> dict:
    state = scaler._per_optimizer_states[id(opt)]
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError(
            "unscale_() has already been called on this optimizer since the last update()."
        )
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    return state


class _Flags:
    """One zero-initialised fp32 flag per (optimizer, device), as GradScaler keeps them."""

    def __init__(self, count: int) -> None:
        self.per_optimizer: list[dict[torch.device, Tensor]] = [{} for _ in range(count)]

    def get(self, k: int, device: torch.device) -> Tensor:
        flags = self.per_optimizer[k]
        if device not in flags:
            flags[device] = torch.zeros((), dtype=torch.float32, device=device)
        return flags[device]


@torch.no_grad()
def clip_grad_norm_scaled_(
    params: list[Tensor],
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
    scaler: GradScaler | None,
    optimizer: object,
    fold_into_optimizer: bool,
    backend: _select.Choice,
    soft: bool = False,
) -> Tensor | None:
    """``clip_grad_norm_(params, max_norm, ..., scaler=, optimizer=, fold_into_optimizer=)``
    (max_norm, norm_type and backend validated by the caller); None when there is nothing to
    unscale or fold (a disabled scaler), meaning: clip as usual."""
    if scaler is not None:
        _check_scaler(scaler)
    optimizers = _optimizers(optimizer)
    if scaler is not None and not scaler.is_enabled():
        # A disabled scaler neither unscales nor removes grad_scale after a step: clip as usual.
        return None
    unscaling = scaler is not None
    states = [_scaler_state(scaler, opt) for opt in optimizers] if unscaling else []
    if unscaling:
        scaler._check_scale_growth_tracker("unscale_")
    if fold_into_optimizer:
        _check_fold_optimizers(optimizers)

    flags = _Flags(len(optimizers))
    inv = _inverse_scale(scaler) if unscaling else None
    inv_on: dict[torch.device, Tensor] = {}

    def inv_for(device: torch.device) -> Tensor | None:
        if inv is None:
            return None
        if device not in inv_on:
            inv_on[device] = inv.to(device, non_blocking=True)
        return inv_on[device]

    result = None
    if not error_if_nonfinite:
        result = _fast(params, optimizers, max_norm, norm_type, fold_into_optimizer, backend,
                       inv_for, flags, soft)
    if result is None:
        result = _general(params, optimizers, max_norm, norm_type, error_if_nonfinite,
                          fold_into_optimizer, backend, unscaling, inv_for, flags,
                          lambda: _set_unscaled(states, flags), soft)
    norm, grad_scale = result
    if grad_scale is not None:
        for opt in optimizers:
            _hand_over_grad_scale(opt, grad_scale, restore=not unscaling)
    _set_unscaled(states, flags)
    return norm


def _inverse_scale(scaler: GradScaler) -> Tensor:
    # As GradScaler.unscale_: the reciprocal in fp64, rounded to fp32 once.
    return scaler._scale.double().reciprocal().float()


def _set_unscaled(states: list[dict], flags: _Flags) -> None:
    for state, found in zip(states, flags.per_optimizer):
        state["found_inf_per_device"] = found
        state["stage"] = OptState.UNSCALED


def _fast(params, optimizers, max_norm, norm_type, fold, backend, inv_for, flags, soft):
    """One optimizer over exactly ``params``, plain gradients on one device: one C++ call reads
    the ``.grad``s and checks the cached plan. (norm, grad_scale or None), or None for the general
    path (which checks everything and raises where it must; the C++ side declines fp16 gradients
    when unscaling, so that the general path refuses them)."""
    if len(optimizers) != 1 or torch.compiler.is_compiling():
        return None
    fast = _select.fast_path(backend)
    if fast is None:
        return None
    flat = [p for group in optimizers[0].param_groups for p in group["params"]]
    if len(flat) != len(params) or not all(map(operator.is_, flat, params)):
        return None
    first = next((p.grad for p in flat if p.grad is not None), None)
    if first is None:
        return None
    impl, cuda_only = fast
    kwargs = dict(cuda_only=cuda_only, inv_scale=inv_for(first.device),
                  found_inf=flags.get(0, first.device), soft=soft)
    if not fold:
        norm = impl.clip_params(params, max_norm, norm_type, **kwargs)
        return None if norm is None else (norm, None)
    result = impl.norm_params(params, max_norm, norm_type, **kwargs)
    if result is None:
        return None
    norm, factor = result
    return norm, factor.reciprocal().float()


def _collect(params, optimizers, unscaling, fold) -> tuple[list[list[Tensor]], list[Tensor]]:
    """(each optimizer's gradients, the gradients of ``params``), checked: fp16 (when
    unscaling), ownership, and the fold's requirement."""
    check_tensor_items(params, "parameters")
    owned = _owned_grads(optimizers, check_fp16=unscaling)
    clipped = grads_of(params)
    owner = {id(g) for grads in owned for g in grads}
    for g in clipped:
        if id(g) not in owner:
            raise ValueError(
                "parameters has a gradient that no optimizer given owns: "
                + ("GradScaler would leave it scaled, so the norm would mix scaled and unscaled "
                   "values" if unscaling else "the optimizer would not apply the clip to it")
            )
    if fold:
        _check_fold_gradients(owned, clipped)
    return owned, clipped


def _general(params, optimizers, max_norm, norm_type, error_if_nonfinite, fold, backend,
             unscaling, inv_for, flags, mark_unscaled, soft):
    """Any number of optimizers and devices, every check: pass 1 per (optimizer, device) group,
    the norms combined on the device, then pass 2 over every gradient (or the fold).
    (norm, grad_scale for the fold or None)."""
    owned, clipped = _collect(params, optimizers, unscaling, fold)
    everything = [g for grads in owned for g in grads]
    if not everything:
        return torch.tensor(0.0), None
    check_writable_grads(everything)
    impl = _select.select(backend, everything)

    clipped_ids = {id(g) for g in clipped}
    one_group = len(owned) == 1 and len(by_device(clipped)) == 1
    if clipped and one_group and not fold and not error_if_nonfinite and \
            len(owned[0]) == len(clipped):
        device = clipped[0].device
        norm = impl.clip_(clipped, max_norm, norm_type, inv_for(device), flags.get(0, device),
                          soft)
        return norm.to(norm_result_dtype(clipped)), None

    norms, extra = [], []
    for k, grads in enumerate(owned):
        mine = [g for g in grads if id(g) in clipped_ids]
        rest = [g for g in grads if id(g) not in clipped_ids]
        for device, ts in by_device(mine).items():
            norms.append(impl.total_norm(ts, norm_type, inv_for(device), flags.get(k, device)))
        for device, ts in by_device(rest).items():
            # Unscaled and checked, not clipped (torch's recipe: unscale_ covers them, the clip
            # does not): pass 1 for the flag, then a multiply by inv_scale.
            impl.total_norm(ts, norm_type, inv_for(device), flags.get(k, device))
            extra.append((ts, inv_for(device)))

    def unscale_extra() -> None:
        for ts, inv in extra:
            impl.scale_(ts, inv.double())

    if not clipped:
        unscale_extra()
        return torch.tensor(0.0), None
    first = clipped[0].device
    norm = norms[0] if len(norms) == 1 else combine_norms(norms, norm_type)
    result_dtype = norm_result_dtype(clipped)
    if error_if_nonfinite and not bool(torch.isfinite(norm.to(result_dtype))):
        # torch's recipe has unscaled everything when its clip raises.
        unscale_extra()
        if inv_for(first) is not None:
            impl.scale_(clipped, inv_for(first).double())
        mark_unscaled()
        raise_if_nonfinite(norm.to(result_dtype), norm_type)
    factor = clip_coef(max_norm, norm, soft)
    if inv_for(first) is not None:
        factor = factor * inv_for(first).double()
    if fold:
        return norm.to(result_dtype), factor.reciprocal().float()
    impl.scale_(clipped, factor)
    unscale_extra()
    return norm.to(result_dtype), None
