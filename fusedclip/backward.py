"""``BackwardClipper``: global-norm clipping that makes no pass over the gradients of its own.

``clip_grad_norm_`` reads every gradient after backward (pass 1, the norm) and scales it (pass 2);
the optimizer then reads it again. Here the norm is taken while backward runs: a post-accumulate-
grad hook on each parameter computes that gradient's partial (m, s) (pass 1 without its finish,
csrc/engine/norm_math.h) right after autograd wrote it, while it is still in cache, into the
parameter's own row of a slot tensor (fp64 [parameters, 2] per device). Accumulating micro-batches
overwrite the row, so the rows always describe the gradients as they are now, whatever order
backward visits the parameters in. When the optimizer steps, the rows are combined in parameter
order (16 bytes read per parameter) into the norm and the clip coefficient, and the coefficient
reaches the gradients through the optimizer's own read of them:

* torch's fused optimizers (Adam, AdamW, SGD, Adagrad with ``fused=True``) divide every gradient by
  their ``grad_scale`` inside the step: the coefficient is handed to them there. No pass at all.
* any other optimizer: one scaling pass (pass 2) in a step pre-hook.
* with a ``GradScaler``: the unscale, the inf/NaN check (an ``m`` that is inf or NaN) and the clip
  are that same finish and one factor, folded or scaled as above, and a step with inf/NaN is
  skipped exactly as torch's recipe skips it (``scaler.step`` reads the flag it set).

What the rows hold is each gradient's exact partial, so the norm is that of
``clip_grad_norm_(parameters, ...)`` called just before the step (to the numerics contract; the
same bits where the summation order is the same: one chunk per gradient, one dtype, aligned).
At the step, a parameter whose hook did not run this step but that has a gradient (accumulated
over steps without ``zero_grad``, or assigned by hand) is read then; one whose gradient was set to
None after its hook ran counts as zero. Nothing synchronizes with the device.

Distributed: with a ``DistributedDataParallel`` model the partials are taken of the averaged
gradients, in a communication hook that wraps the all-reduce (or the user's own hook,
``comm_hook=``), one call per bucket; FSDP2 calls the hooks on the reduced shards, and the norm is
finished as ``clip_grad_norm_`` finishes it for DTensors (one all-reduce per sharding mesh
dimension, ``fusedclip.distributed``).

``optimizer_in_backward=True`` is for a per-parameter optimizer stepped inside its own
post-accumulate-grad hook (torchtune, torchtitan): there the norm of the step is not known yet, so
each gradient is scaled, as backward produces it, by the coefficient of the *previous* step's
norm (the first step is not clipped), and this step's norm is finished when backward ends. Never
enabled silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from fusedclip import _select, amp, distributed
from fusedclip._args import as_pass_norm_type, as_soft, as_threshold, norm_result_dtype
from fusedclip.backends import Backend, cpp
from fusedclip.backends._math import clip_coef, combine_norms
from fusedclip.backends._multi_tensor import kernels_take
from fusedclip.backends.cpp import _lib

__all__ = ["BackwardClipper"]

_WHAT = "BackwardClipper"


def _parameters(model_or_params: object) -> tuple[list[Tensor], object]:
    """The parameters that take gradients, each once, in order; and the DDP wrapper, if any."""
    ddp = None
    if isinstance(model_or_params, torch.nn.parallel.DistributedDataParallel):
        ddp = model_or_params
    if isinstance(model_or_params, torch.nn.Module):
        items: Iterable = model_or_params.parameters()
    elif isinstance(model_or_params, Tensor):
        items = [model_or_params]
    else:
        items = model_or_params
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{_WHAT} takes a module or an iterable of parameters, got "
                        f"{type(model_or_params).__name__}") from None
    seen: set[int] = set()
    params = []
    for i, p in enumerate(items):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError(f"{_WHAT}: no parameter requires a gradient")
    return params, ddp


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2's reduced gradient), anything else as it is."""
    return t.to_local() if distributed.has_dtensor([t]) else t


class _Device:
    """The rows of the parameters whose gradients live on one device, and the backend they run
    on there."""

    def __init__(self, device: torch.device, indices: list[int], impl: Backend) -> None:
        self.device = device
        self.indices = indices  # parameter indices, in parameter order
        self.impl = impl
        self.partials = torch.zeros((len(indices), 2), dtype=torch.float64, device=device)
        self.rows = list(self.partials.split(1))


class BackwardClipper:
    """Clip the global gradient norm with no pass of its own (module docstring).

    >>> clipper = fusedclip.BackwardClipper(model, max_norm=1.0, optimizer=opt)
    >>> loss_fn(model(x)).backward()   # partial norms taken as the gradients appear
    >>> opt.step()                     # clipped inside the step
    >>> clipper.last_norm              # this step's norm (a tensor; never synchronized)

    ``model_or_params``: a module (a ``DistributedDataParallel`` one: partials of the averaged
    gradients) or parameters; those that require gradients are clipped together, as
    ``clip_grad_norm_(parameters, max_norm, norm_type)`` clips them. ``optimizer``: the optimizer
    (or a list) whose step applies the clip; without one, call ``clip_()`` before your own step.
    ``scaler``: a ``torch.amp.GradScaler`` (use torch's recipe without ``unscale_`` and without a
    clip call); every parameter of the optimizer must then be clipped here. ``mode``: ``"hard"``
    or ``"soft"`` coefficients, as in ``clip_grad_norm_``. ``comm_hook``/``comm_state``: the DDP
    communication hook to wrap (default: averaging all-reduce). ``optimizer_in_backward``: scale
    each gradient in backward by the previous step's coefficient (module docstring).

    ``remove()`` (or leaving a ``with`` block) takes every hook away; a DDP communication hook
    cannot be unregistered, and passes buckets through untouched from then on.
    """

    def __init__(
        self,
        model_or_params: torch.nn.Module | Tensor | Iterable[Tensor],
        max_norm: float,
        norm_type: float = 2.0,
        *,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        backend: str | None = None,
        mode: str = "hard",
        optimizer_in_backward: bool = False,
        comm_hook: Callable | None = None,
        comm_state: object = None,
    ) -> None:
        self.max_norm = as_threshold(max_norm, "max_norm")
        self.norm_type = as_pass_norm_type(norm_type, _WHAT)
        self._soft = as_soft(mode)
        choice = _select.parse(backend)
        params, ddp = _parameters(model_or_params)
        self._params = params
        self._optimizers = [] if optimizer is None else amp._optimizers(optimizer)
        self._scaler = scaler
        self._in_backward = bool(optimizer_in_backward)
        self._check_options(ddp, comm_hook)
        self._folds = self._fold_plan()
        self._devices = self._device_groups(choice)
        self._where = {i: (dev, r) for dev in self._devices for r, i in enumerate(dev.indices)}
        self._index = {id(p): i for i, p in enumerate(params)}
        self._fresh = [False] * len(params)
        self._finished = False
        self._auto = choice.name == "auto"
        self._active = True
        self._previous_coef: Tensor | None = None
        self._end_queued = False
        self.last_norm: Tensor | None = None
        self.last_coef: Tensor | None = None
        self._handles: list = []
        self._scaler_methods: dict[str, Callable] = {}
        if ddp is not None:
            self._install_comm_hook(ddp, comm_hook, comm_state)
        else:
            for i, p in enumerate(params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook_for(i)))
        for opt in self._optimizers:
            self._handles.append(opt.register_step_pre_hook(self._before_step))
        if scaler is not None:
            self._wrap_scaler(scaler)

    # ---- construction ------------------------------------------------------------------------

    def _check_options(self, ddp: object, comm_hook: object) -> None:
        if comm_hook is not None and ddp is None:
            raise ValueError("comm_hook= is for a DistributedDataParallel model")
        if self._scaler is not None:
            amp._check_scaler(self._scaler)
            if not self._optimizers:
                raise ValueError("scaler= needs optimizer=: the optimizer(s) GradScaler steps")
            clipped = {id(p) for p in self._params}
            for opt in self._optimizers:
                if any(id(p) not in clipped for g in opt.param_groups for p in g["params"]):
                    raise ValueError(
                        f"{_WHAT} with scaler= unscales the gradients it clips; "
                        f"{type(opt).__name__} has parameters it does not clip, which GradScaler "
                        "would leave scaled: clip every parameter of the optimizer"
                    )
        if self._in_backward:
            if self._optimizers or self._scaler is not None:
                raise ValueError(
                    "optimizer_in_backward=True scales each gradient in backward, before your "
                    "per-parameter optimizers step it: optimizer= and scaler= do not apply"
                )
            if ddp is not None:
                raise ValueError("optimizer_in_backward=True does not take a DDP model yet")
            for i, p in enumerate(self._params):
                if getattr(p, "_post_accumulate_grad_hooks", None):
                    raise ValueError(
                        f"parameters[{i}] already has a post-accumulate-grad hook: create the "
                        f"{_WHAT} before registering your optimizer's hooks, so that each "
                        "gradient is clipped before the optimizer steps it"
                    )

    def _fold_plan(self) -> list[torch.optim.Optimizer]:
        """The optimizers that take the coefficient as ``grad_scale``: torch's fused ones whose
        parameters are all clipped here (they divide every gradient they step by it)."""
        clipped = {id(p) for p in self._params}
        folds = []
        for opt in self._optimizers:
            try:
                amp._check_fold_optimizers([opt])
            except ValueError:
                continue
            if all(id(p) in clipped for g in opt.param_groups for p in g["params"]):
                folds.append(opt)
        return folds

    def _device_groups(self, choice: _select.Choice) -> list[_Device]:
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(self._params):
            by_device.setdefault(_local(p.detach()).device, []).append(i)
        groups = []
        for device, indices in by_device.items():
            sample = [_local(self._params[i].detach()) for i in indices]
            groups.append(_Device(device, indices, _select.select(choice, sample)))
        return groups

    # ---- during backward ---------------------------------------------------------------------

    def _begin_step(self) -> None:
        """The first gradient after a finish: the rows start over."""
        for dev in self._devices:
            dev.partials.zero_()
        self._fresh = [False] * len(self._params)
        self._finished = False

    def _take(self, i: int, grad: Tensor) -> None:
        """Gradient ``i``'s partial into its row."""
        dev, r = self._where[i]
        local = _local(grad)
        impl = dev.impl
        if self._auto and not kernels_take([local]):
            impl = _select.get("reference")  # auto's rule for what the kernels do not take
        impl.partials_([local], self.norm_type, dev.rows[r])
        self._fresh[i] = True

    def _hook_for(self, i: int) -> Callable[[Tensor], None]:
        dev, r = self._where[i]
        row, p = dev.rows[r], self.norm_type
        # The compiled engine's one-call path (no dispatcher, the cached one-tensor plan); False
        # from it, or another backend, takes the general one.
        fast = _lib.module().partial_into if dev.impl is cpp.BACKEND and _lib.loaded() else None

        def after_accumulate(param: Tensor) -> None:
            if not self._active:
                return
            if self._finished:
                self._begin_step()
            grad = param.grad
            if grad is None:
                return
            if fast is not None and fast(grad, p, row):
                self._fresh[i] = True
            else:
                self._take(i, grad)
            if self._in_backward:
                self._clip_in_backward(grad)

        return after_accumulate

    # ---- the finish --------------------------------------------------------------------------

    def _reconcile(self) -> list[Tensor]:
        """The gradients clipped this step, after the rows were made to match them: read now where
        no hook ran (a gradient kept from an earlier step), zeroed where the gradient is gone."""
        grads = []
        fresh = self._fresh
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                if fresh[i]:
                    dev, r = self._where[i]
                    dev.rows[r].zero_()
                    fresh[i] = False
                continue
            if not fresh[i]:
                self._take(i, g)
            grads.append(g)
        return grads

    def _finish(self, inv_scale: Tensor | None,
                found_inf: Callable[[torch.device], Tensor] | None) -> tuple[list[Tensor], Tensor]:
        """This step's norm (``last_norm``) and coefficient (fp64, with ``inv_scale`` folded in)
        from the rows; the gradients they describe (none with ``optimizer_in_backward``: its
        optimizers have consumed them, and the rows are the record)."""
        grads = [] if self._in_backward else self._reconcile()
        p = self.norm_type
        if len(self._devices) == 1 and not self._sharded(grads):
            dev = self._devices[0]
            flag = None if found_inf is None else found_inf(dev.device)
            inv = None if inv_scale is None else inv_scale.to(dev.device, non_blocking=True)
            norm, coef = dev.impl.finish_partials(dev.partials, p, self.max_norm, inv, flag,
                                                  self._soft)
        else:
            norm, coef = self._finish_spread(grads, inv_scale, found_inf)
        self.last_norm = norm.to(norm_result_dtype(grads or self._params))
        self.last_coef = coef
        self._finished = True
        return grads, coef

    def _sharded(self, grads: list[Tensor]) -> bool:
        return distributed.has_dtensor(grads[:1])

    def _finish_spread(self, grads, inv_scale, found_inf) -> tuple[Tensor, Tensor]:
        """Several devices, or DTensor gradients: each device's (or signature's) norm from its
        rows, combined on the first device (and over the mesh for DTensors)."""
        p = self.norm_type
        first = self._devices[0].device

        def rows_norm(dev: _Device, rows: Tensor | None = None) -> Tensor:
            flag = None if found_inf is None else found_inf(dev.device)
            part = dev.partials if rows is None else dev.partials.index_select(0, rows)
            return dev.impl.finish_partials(part, p, math.inf, None, flag)[0]

        if self._sharded(grads):
            local = distributed.local_shards(grads)
            # local.tensors follow grads, which follow the parameters that have a gradient.
            where = [self._where[i] for i, q in enumerate(self._params) if q.grad is not None]
            row_of = {id(t): w for t, w in zip(local.tensors, where)}

            def local_norm(tensors: list[Tensor]) -> Tensor:
                dev = row_of[id(tensors[0])][0]
                rows = torch.tensor([row_of[id(t)][1] for t in tensors], device=dev.device)
                return rows_norm(dev, rows)

            norm = distributed.sharded_norm(local, p, local_norm, None, first)
        else:
            norm = combine_norms([rows_norm(dev) for dev in self._devices], p)
        if inv_scale is not None:
            norm = norm * inv_scale.to(first, torch.float64).reshape(())
        coef = clip_coef(self.max_norm, norm, self._soft)
        if inv_scale is not None:
            coef = coef * inv_scale.to(first, torch.float64).reshape(())
        return norm, coef

    def _apply(self, grads: list[Tensor], coef: Tensor, unscaling: bool) -> None:
        """The coefficient into the step: ``grad_scale`` of the fused optimizers that take it, one
        scaling pass over every other gradient."""
        folded: set[int] = set()
        if self._folds:
            grad_scale = coef.reciprocal().float()
            for opt in self._folds:
                amp._hand_over_grad_scale(opt, grad_scale, restore=not unscaling)
                folded.update(id(p.grad) for g in opt.param_groups for p in g["params"]
                              if p.grad is not None)
        rest = [g for g in grads if id(g) not in folded]
        for dev_grads in _by_device(rest).values():
            local = [_local(g) for g in dev_grads]
            self._impl_for(local[0].device).scale_(local, coef)

    def _impl_for(self, device: torch.device) -> Backend:
        for dev in self._devices:
            if dev.device == device:
                return dev.impl
        return self._devices[0].impl

    # ---- triggers: the optimizer's step, GradScaler, or by hand -----------------------------

    def _before_step(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if not self._active or self._finished:
            return
        if self._scaler is not None and self._scaler.is_enabled():
            # Stepped without scaler.step: torch's recipe would have unscaled in step().
            self._unscale_and_clip(None)
            return
        grads, coef = self._finish(None, None)
        self._apply(grads, coef, unscaling=False)

    def clip_(self) -> Tensor:
        """Finish this step's norm and apply the clip now (the fold or the scaling pass): for
        loops that step their own optimizer; the norm. A no-op returning ``last_norm`` when this
        step is already finished."""
        if self._scaler is not None or self._in_backward:
            raise RuntimeError(f"{_WHAT}.clip_() is for loops without scaler= and without "
                               "optimizer_in_backward=True (those finish the step themselves)")
        if not self._finished:
            grads, coef = self._finish(None, None)
            self._apply(grads, coef, unscaling=False)
        return self.last_norm

    def _unscale_and_clip(self, optimizer: torch.optim.Optimizer | None) -> None:
        """``GradScaler.unscale_`` for this clipper's optimizers: the finish with the inverse
        scale, the found-inf flags GradScaler reads, one factor that unscales and clips."""
        scaler = self._scaler
        states = []
        for opt in self._optimizers:
            states.append(amp._scaler_state(scaler, opt))
        scaler._check_scale_growth_tracker("unscale_")
        flags = amp._Flags(1)
        grads, coef = self._finish(amp._inverse_scale(scaler), lambda d: flags.get(0, d))
        self._apply(grads, coef, unscaling=True)
        for state in states:
            state["found_inf_per_device"] = dict(flags.per_optimizer[0])
            state["stage"] = amp.OptState.UNSCALED

    def _wrap_scaler(self, scaler: torch.amp.GradScaler) -> None:
        """``scaler.unscale_`` and ``scaler.step`` of this instance, for this clipper's
        optimizers: unscale + check + clip are the finish (a step with inf/NaN is skipped by
        ``scaler.step`` as usual); other optimizers get GradScaler's own."""
        mine = {id(o) for o in self._optimizers}
        unscale, step = scaler.unscale_, scaler.step

        def unscale_(optimizer):
            if not self._active or id(optimizer) not in mine or not scaler.is_enabled():
                return unscale(optimizer)
            amp._scaler_state(scaler, optimizer)  # torch's errors for a second call
            if not self._finished:
                self._unscale_and_clip(optimizer)
            return None

        def step_(optimizer, *args, **kwargs):
            if (self._active and id(optimizer) in mine and scaler.is_enabled()
                    and not self._finished and
                    scaler._per_optimizer_states[id(optimizer)]["stage"] is amp.OptState.READY):
                self._unscale_and_clip(optimizer)
            return step(optimizer, *args, **kwargs)

        self._scaler_methods = {"unscale_": unscale_, "step": step_}
        scaler.unscale_ = unscale_
        scaler.step = step_

    # ---- optimizer in backward ---------------------------------------------------------------

    def _clip_in_backward(self, grad: Tensor) -> None:
        """Scaled by the previous step's coefficient before the user's hook steps it; this step's
        norm is finished when backward ends."""
        if self._previous_coef is not None:
            local = _local(grad)
            self._impl_for(local.device).scale_([local], self._previous_coef)
        if not self._end_queued:
            self._end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._end_queued = False
        self._finish(None, None)
        self._previous_coef = self.last_coef

    # ---- distributed data parallel -----------------------------------------------------------

    def _install_comm_hook(self, ddp, comm_hook, comm_state) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        inner = comm_hook if comm_hook is not None else default_hooks.allreduce_hook
        state = comm_state if comm_hook is not None else ddp.process_group
        layouts: dict[int, tuple] = {}

        def hook(_, bucket):
            fut = inner(state, bucket)
            if not self._active:
                return fut

            def after(f):
                value = f.value()
                reduced = value[0] if isinstance(value, (list, tuple)) else value
                self._take_bucket(bucket, reduced, layouts)
                return reduced

            return fut.then(after)

        ddp.register_comm_hook(None, hook)

    def _take_bucket(self, bucket, reduced: Tensor, layouts: dict[int, tuple]) -> None:
        """The partials of a reduced bucket's gradients into their rows: one call per bucket."""
        if self._finished:
            self._begin_step()
        params = bucket.parameters()
        key = bucket.index()
        layout = layouts.get(key)
        if layout is None or layout[0] != [id(p) for p in params]:
            base = bucket.buffer().data_ptr()
            spans = [((g.data_ptr() - base) // g.element_size(), g.numel(), g.shape)
                     for g in bucket.gradients()]
            idx = [self._index[id(p)] for p in params]
            dev = self._where[idx[0]][0]
            rows = torch.tensor([self._where[i][1] for i in idx], device=dev.device)
            layout = ([id(p) for p in params], spans, idx, dev, rows)
            layouts[key] = layout
        _, spans, idx, dev, rows = layout
        views = [reduced.narrow(0, start, n) for start, n, _ in spans]
        out = torch.empty((len(views), 2), dtype=torch.float64, device=dev.device)
        dev.impl.partials_(views, self.norm_type, out)
        dev.partials.index_copy_(0, rows, out)
        for i in idx:
            self._fresh[i] = True

    # ---- lifetime ----------------------------------------------------------------------------

    def remove(self) -> None:
        """Takes every hook away (the DDP communication hook stays, passing buckets through)."""
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._scaler is not None:
            for name, method in self._scaler_methods.items():
                if self._scaler.__dict__.get(name) is method:
                    del self._scaler.__dict__[name]
            self._scaler_methods = {}

    def __enter__(self) -> BackwardClipper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(_local(t).device, []).append(t)
    return groups
