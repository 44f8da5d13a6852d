"""``BackwardClipper``: the norm taken in backward, the clip applied by the optimizer's step.

Every test trains a model with the clipper and a twin without it that clips the torch way
(``clip_grad_norm_`` on the accumulated gradients, then the step) and compares: the norm against
the fp64 oracle of the gradients as they stood before the step, the parameters against the twin's.
SGD (plain and fused) is the optimizer that can see a wrong factor (Adam's update hardly depends on
the gradient's scale); fused AdamW is the fold the README promises. Then what the clipper must do
that the plain recipe does not say: rows that follow accumulation, parameters without gradients,
gradients kept from an earlier step, removal, GradScaler (a step with inf skipped), a per-parameter
optimizer in backward, no host synchronization, and the passes: nothing reads a gradient between
backward and the optimizer's update but the optimizer.
"""

from __future__ import annotations

import math
import random
from unittest import mock

import pytest
import torch
from oracle import NORM_RTOL, oracle_coef, oracle_norm
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedclip
from fusedclip.backends.cpp import _lib
from fusedclip.torch_patch import torch_function

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NORM_TYPES = [2.0, 1.0, math.inf, 0.5, 3.0]
# Parameters stepped with the twin's factor must match to a few roundings of their dtype (the fold
# divides inside the fused kernel in fp32, the twin multiplies first); the absolute part is for
# Adam's updates near zero, where one rounding of a gradient moves m / sqrt(v) a little.
PARAM_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-12}
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _model(dtype=torch.float32, device="cpu", wide=False, seed=0):
    """An MLP; ``wide``: a first layer of 90,300 elements, two chunks of the kernels' table."""
    torch.manual_seed(seed)
    first = nn.Linear(300, 300) if wide else nn.Linear(300, 24)
    inner = 300 if wide else 24
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(inner, 17), nn.Tanh(), nn.Linear(17, 3))
    return model.to(device=device, dtype=dtype)


def _inputs(count, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 300, generator=gen).to(device=device, dtype=dtype)
            for _ in range(count)]


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1.0)
    if kind == "sgd-fused":
        return torch.optim.SGD(params, lr=1.0, fused=True)
    if kind == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-2, fused=True)
    raise ValueError(kind)


def _snapshot(model):
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def _assert_norm(got, grads, norm_type, dtype=None):
    expected = oracle_norm([g for g in grads if g is not None], norm_type)
    assert got.dtype == (dtype or torch.float32)
    torch.testing.assert_close(got.double().cpu(), torch.tensor(expected, dtype=torch.float64),
                               rtol=NORM_RTOL, atol=0)


def _assert_same_params(model, twin, dtype):
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=PARAM_RTOL[dtype], atol=PARAM_RTOL[dtype] * 0.1)


def _assert_scaled(model, grads, coef, dtype=torch.float32, roundings=1):
    """Each gradient is its value before the step times ``coef``, to ``roundings`` roundings."""
    for p, g in zip(model.parameters(), grads):
        if g is not None:
            torch.testing.assert_close(p.grad, (g.double() * coef).to(dtype),
                                       rtol=roundings * EPS[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer", ["sgd", "sgd-fused", "adamw-fused"])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_matches_clip_then_step(backend, device, dtype, optimizer, micro_batches):
    """Three steps of ``micro_batches`` accumulated backward passes each: the norm is the oracle's
    of the accumulated gradients, the parameters the twin's (clip_grad_norm_, then the step), and
    the gradients after the step are scaled by the oracle's coefficient (plain SGD: by the pass in
    the step pre-hook; the fused optimizers divide by the folded grad_scale in their step and
    store the result, as they do with GradScaler's)."""
    if device == "cpu" and dtype == torch.float16 and optimizer != "sgd":
        pytest.skip("torch's fused optimizers take no float16 parameters on the CPU")
    model, twin = _model(dtype, device, wide=True), _model(dtype, device, wide=True)
    opt, twin_opt = _optimizer(optimizer, model.parameters()), _optimizer(optimizer,
                                                                          twin.parameters())
    clipper = fusedclip.BackwardClipper(model, 1.0, optimizer=opt, backend=backend)
    batches = _inputs(3 * micro_batches, dtype, device)
    for step in range(3):
        for x in batches[step * micro_batches:(step + 1) * micro_batches]:
            model(x).pow(2).sum().backward()
            twin(x).pow(2).sum().backward()
        grads = _snapshot(model)
        opt.step()
        expected = fusedclip.clip_grad_norm_(twin.parameters(), 1.0, backend="reference")
        twin_opt.step()
        _assert_norm(clipper.last_norm, grads, 2.0)
        norm = oracle_norm([g for g in grads if g is not None], 2.0)
        assert float(expected) > 2.0 and norm > 2.0  # every step clips
        _assert_scaled(model, grads, oracle_coef(1.0, norm), dtype,
                       roundings=1 if optimizer == "sgd" else 2)
        opt.zero_grad()
        twin_opt.zero_grad()
        _assert_same_params(model, twin, dtype)
    clipper.remove()


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_every_norm_type(backend, device, norm_type):
    """The norm of every p the fused path takes, and the coefficient it hands over (plain SGD
    scales the gradients by it in the step pre-hook)."""
    model = _model(torch.float32, device, wide=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    clipper = fusedclip.BackwardClipper(model, 0.05, norm_type, optimizer=opt, backend=backend)
    for x in _inputs(2, torch.float32, device):
        model(x).pow(2).sum().backward()
    grads = _snapshot(model)
    opt.step()
    _assert_norm(clipper.last_norm, grads, norm_type)
    _assert_scaled(model, grads, oracle_coef(0.05, oracle_norm(grads, norm_type)))
    clipper.remove()


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -math.inf, math.nan, "fro"])
def test_refuses_norm_types_the_passes_do_not_take(norm_type):
    model = _model()
    with pytest.raises((ValueError, TypeError), match="norm_type|BackwardClipper"):
        fusedclip.BackwardClipper(model, 1.0, norm_type)
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_refuses_bad_arguments_before_installing_anything():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD([nn.Parameter(torch.zeros(3))] + list(model.parameters()), lr=0.1)
    cases = [
        (dict(max_norm=-1.0), ValueError, "max_norm"),
        (dict(max_norm=math.nan), ValueError, "max_norm"),
        (dict(max_norm=1.0, mode="wild"), ValueError, "mode"),
        (dict(max_norm=1.0, backend="nope"), ValueError, "backend"),
        (dict(max_norm=1.0, scaler=torch.amp.GradScaler("cpu")), ValueError, "optimizer="),
        (dict(max_norm=1.0, scaler=torch.amp.GradScaler("cpu"), optimizer=other), ValueError,
         "does not clip"),
        (dict(max_norm=1.0, optimizer=opt, optimizer_in_backward=True), ValueError,
         "optimizer_in_backward"),
        (dict(max_norm=1.0, comm_hook=lambda s, b: None), ValueError, "DistributedDataParallel"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fusedclip.BackwardClipper(model, **kwargs)
    with pytest.raises(ValueError, match="no parameter"):
        fusedclip.BackwardClipper(nn.Linear(2, 2).requires_grad_(False), 1.0)
    with pytest.raises(TypeError, match="iterable"):
        fusedclip.BackwardClipper(3, 1.0)
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    assert not opt._optimizer_step_pre_hooks


@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
def test_same_bits_as_clip_grad_norm_where_the_order_is_the_same(backend_name):
    """One fp32 chunk per gradient, every gradient aligned: the rows are pass 1's chunk partials
    in the same order, so the norm has clip_grad_norm_'s bits."""
    status = fusedclip.available_backends()[backend_name]
    if not status.runs_on("cpu"):
        pytest.skip(f"{backend_name} cannot run CPU tensors here: {status.reason}")
    model, twin = _model(), _model()
    clipper = fusedclip.BackwardClipper(model, 0.05, backend=backend_name)
    for x in _inputs(2, torch.float32, "cpu"):
        model(x).pow(3).sum().backward()
        twin(x).pow(3).sum().backward()
    norm = clipper.clip_()
    expected = fusedclip.clip_grad_norm_(twin.parameters(), 0.05, backend=backend_name)
    assert torch.equal(norm, expected), (norm, expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))


def test_rows_do_not_depend_on_the_order_backward_visits(backend):
    """The hooks called in a shuffled order give the same bits: each gradient has its own row and
    the rows are combined in parameter order."""
    norms = []
    for seed in range(3):
        model = _model(wide=True)
        clipper = fusedclip.BackwardClipper(model, 0.05, backend=backend)
        gen = torch.Generator().manual_seed(7)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        order = list(range(len(params)))
        random.Random(seed).shuffle(order)
        for i in order:
            for hook in params[i]._post_accumulate_grad_hooks.values():
                hook(params[i])
        norms.append(clipper.clip_())
        clipper.remove()
    assert all(torch.equal(n, norms[0]) for n in norms)


class _Branchy(nn.Module):
    """A frozen layer, a layer used twice (shared), and a branch that only some steps use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(300, 24).requires_grad_(False)
        self.shared = nn.Linear(24, 24)
        self.branch = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x, use_branch):
        h = torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.frozen(x))))))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_shared_unused_parameters_and_zero_grad(backend, device, set_to_none):
    model, twin = _Branchy().to(device), _Branchy().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    clipper = fusedclip.BackwardClipper(model, 0.05, optimizer=opt, backend=backend)
    for step, x in enumerate(_inputs(4, torch.float32, device)):
        use_branch = step % 2 == 0
        model(x, use_branch).pow(2).sum().backward()
        twin(x, use_branch).pow(2).sum().backward()
        grads = _snapshot(model)
        opt.step()
        torch_function("clip_grad_norm_")(list(twin.parameters()), 0.05)
        twin_opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        twin_opt.zero_grad(set_to_none=set_to_none)
        _assert_norm(clipper.last_norm, grads, 2.0)
        _assert_same_params(model, twin, torch.float32)
    assert model.frozen.weight.grad is None


def test_gradients_not_written_this_step_still_count(backend):
    """A gradient kept from an earlier step (no zero_grad for it) and one assigned by hand count
    as clip_grad_norm_ counts them; one set to None after its hook ran counts as zero."""
    model = _model()
    clipper = fusedclip.BackwardClipper(model, 0.05, backend=backend)
    x = _inputs(1, torch.float32, "cpu")[0]
    model(x).pow(2).sum().backward()
    clipper.clip_()  # step 1 finished
    first, second, third = model[0], model[2], model[4]
    with torch.no_grad():  # step 2: only the head takes part in backward
        h = torch.tanh(second(torch.tanh(first(x))))
    third(h).pow(2).sum().backward()
    first.bias.grad = None  # gone after backward
    second.weight.grad = torch.full_like(second.weight, 0.25)  # assigned by hand, no hook ran
    grads = _snapshot(model)
    norm = clipper.clip_()
    _assert_norm(norm, grads, 2.0)
    clipper.remove()


def test_remove_and_the_context_manager_take_every_hook_away():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu")
    with fusedclip.BackwardClipper(model, 0.05, optimizer=opt, scaler=scaler) as clipper:
        assert all(p._post_accumulate_grad_hooks for p in model.parameters())
        assert opt._optimizer_step_pre_hooks and "step" in scaler.__dict__
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    assert not opt._optimizer_step_pre_hooks
    assert "step" not in scaler.__dict__ and "unscale_" not in scaler.__dict__
    model(_inputs(1, torch.float32, "cpu")[0]).pow(2).sum().backward()
    before = _snapshot(model)
    opt.step()  # plain SGD, nothing clipped
    assert clipper.last_norm is None
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_an_optimizer_with_parameters_it_does_not_clip_gets_the_scaling_pass():
    """A fused optimizer divides every gradient it steps by grad_scale: with a parameter the
    clipper does not clip it cannot take the fold, and the clipped gradients are scaled instead."""
    model = _model()
    extra = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.0, fused=True)
    clipper = fusedclip.BackwardClipper(model, 0.05, optimizer=opt)
    model(_inputs(1, torch.float32, "cpu")[0]).pow(2).sum().backward()
    extra.grad = torch.full((3,), 2.0)
    grads = _snapshot(model)
    opt.step()
    assert not hasattr(opt, "grad_scale")
    _assert_scaled(model, grads, oracle_coef(0.05, oracle_norm(grads, 2.0)))
    assert torch.equal(extra.grad, torch.full((3,), 2.0))
    clipper.remove()


def test_fold_hands_grad_scale_to_the_step_only():
    """The fold is the step's grad_scale (1 / the coefficient) and nothing else: the gradients are
    untouched until the step, and a grad_scale the user set is multiplied in, then restored."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, fused=True)
    clipper = fusedclip.BackwardClipper(model, 0.05, optimizer=opt)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        (o.grad_scale.clone(), [p.grad.clone() for p in model.parameters()])))
    mine = torch.tensor(2.0)
    opt.grad_scale = mine
    model(_inputs(1, torch.float32, "cpu")[0]).pow(2).sum().backward()
    grads = _snapshot(model)
    opt.step()
    handed, at_step = seen[0]
    coef = oracle_coef(0.05, oracle_norm(grads, 2.0))
    torch.testing.assert_close(handed.double(), torch.tensor(2.0 / coef, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert all(torch.equal(a, g) for a, g in zip(at_step, grads))
    assert opt.grad_scale is mine
    clipper.remove()


# ---- AMP ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "sgd-fused", "adamw-fused"])
def test_grad_scaler_recipe(backend, device, optimizer):
    """Six steps with a dynamic GradScaler and an inf in step 3, against torch's recipe (scale,
    backward, unscale_, clip_grad_norm_, step, update): the same scale trajectory, the same
    skipped step, the same parameters."""
    model, twin = _model(device=device), _model(device=device)
    opt, twin_opt = _optimizer(optimizer, model.parameters()), _optimizer(optimizer,
                                                                          twin.parameters())
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    twin_scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    clipper = fusedclip.BackwardClipper(model, 0.05, optimizer=opt, scaler=scaler,
                                        backend=backend)
    scales, norms = [], []
    for step, x in enumerate(_inputs(6, torch.float32, device)):
        if step == 3:
            x[0, 0] = math.inf
        scaler.scale(model(x).pow(2).sum()).backward()
        twin_scaler.scale(twin(x).pow(2).sum()).backward()
        scaler.step(opt)
        scaler.update()
        twin_scaler.unscale_(twin_opt)
        expected = torch_function("clip_grad_norm_")(list(twin.parameters()), 0.05)
        twin_scaler.step(twin_opt)
        twin_scaler.update()
        opt.zero_grad()
        twin_opt.zero_grad()
        scales.append((scaler.get_scale(), twin_scaler.get_scale()))
        norms.append((float(clipper.last_norm), float(expected)))
        _assert_same_params(model, twin, torch.float32)
    assert all(a == b for a, b in scales), scales
    assert scales[3][0] == scales[2][0] / 2  # the inf step was skipped and backed off
    for k, (got, want) in enumerate(norms):
        assert (math.isnan(got) and math.isnan(want)) if k == 3 else \
            math.isclose(got, want, rel_tol=1e-5), (k, got, want)
    clipper.remove()


def test_grad_scaler_disabled_is_plain_clipping():
    model, twin = _model(), _model()
    opt, twin_opt = _optimizer("sgd", model.parameters()), _optimizer("sgd", twin.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    clipper = fusedclip.BackwardClipper(model, 0.05, optimizer=opt, scaler=scaler)
    x = _inputs(1, torch.float32, "cpu")[0]
    scaler.scale(model(x).pow(2).sum()).backward()
    twin(x).pow(2).sum().backward()
    scaler.step(opt)
    torch_function("clip_grad_norm_")(list(twin.parameters()), 0.05)
    twin_opt.step()
    _assert_same_params(model, twin, torch.float32)
    clipper.remove()


def test_grad_scaler_unscale_called_by_hand_is_the_fused_one():
    """A loop that still calls ``scaler.unscale_(opt)`` (to log the unscaled gradients) gets the
    fused unscale + clip there, once; scaler.step then steps."""
    model, twin = _model(), _model()
    opt, twin_opt = _optimizer("sgd", model.parameters()), _optimizer("sgd", twin.parameters())
    scaler, twin_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    clipper = fusedclip.BackwardClipper(model, 0.05, optimizer=opt, scaler=scaler)
    x = _inputs(1, torch.float32, "cpu")[0]
    scaler.scale(model(x).pow(2).sum()).backward()
    twin_scaler.scale(twin(x).pow(2).sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    twin_scaler.unscale_(twin_opt)
    torch_function("clip_grad_norm_")(list(twin.parameters()), 0.05)
    twin_scaler.step(twin_opt)
    _assert_same_params(model, twin, torch.float32)
    clipper.remove()


# ---- optimizer in backward ---------------------------------------------------------------------

def test_optimizer_in_backward_clips_with_the_previous_norm(backend):
    """A per-parameter SGD stepped in each parameter's post-accumulate-grad hook: step k's
    gradients are scaled by the coefficient of step k - 1's norm (step 0 unclipped), and
    ``last_norm`` is step k's own norm, finished when backward ends."""
    model, twin = _model(), _model()
    clipper = fusedclip.BackwardClipper(model, 0.05, backend=backend,
                                        optimizer_in_backward=True)
    opts = {p: torch.optim.SGD([p], lr=0.5) for p in model.parameters()}

    def step_now(p):
        opts[p].step()
        opts[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_now)
    coef = 1.0
    for x in _inputs(4, torch.float32, "cpu"):
        model(x).pow(2).sum().backward()
        twin(x).pow(2).sum().backward()
        grads = _snapshot(twin)
        with torch.no_grad():
            for q in twin.parameters():
                q -= 0.5 * (q.grad.double() * coef).float()
                q.grad = None
        _assert_norm(clipper.last_norm, grads, 2.0)
        coef = oracle_coef(0.05, oracle_norm(grads, 2.0))
        _assert_same_params(model, twin, torch.float32)
        assert all(p.grad is None for p in model.parameters())
    clipper.remove()


def test_optimizer_in_backward_needs_the_clipper_first():
    model = _model()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: None)
    with pytest.raises(ValueError, match="before registering"):
        fusedclip.BackwardClipper(model, 0.05, optimizer_in_backward=True)


# ---- no synchronization, no passes ------------------------------------------------------------

class _Recorder(TorchDispatchMode):
    """Every operator called inside, with whether it touched a watched tensor's memory; an
    operator that reads a value back to the host (``.item()``, ``bool()``: a synchronization on a
    GPU) fails, beyond the ``syncs`` allowed."""

    def __init__(self, watched=(), syncs=0):
        super().__init__()
        self.watched = {t.untyped_storage().data_ptr() for t in watched}
        self.calls = []
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs -= 1
            if self.syncs < 0:
                raise AssertionError(f"{func} synchronizes the host with the device")
        kwargs = kwargs or {}
        touched = False
        for a in [*args, *kwargs.values()]:
            for t in a if isinstance(a, (list, tuple)) else [a]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.watched:
                    touched = True
        self.calls.append((str(func.name()), touched))
        return func(*args, **kwargs)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw-fused"])
def test_no_pass_between_backward_and_the_update(optimizer):
    """During backward each gradient is read by one partials_ call per accumulation; after it,
    nothing touches a gradient before the optimizer's own update but, without a fused optimizer,
    the one scaling pass; and nothing reads a value back to the host, but torch's own
    ``GradScaler.step`` for an unfused optimizer (it reads found_inf to decide whether to step)."""
    if not _lib.loaded():
        pytest.skip(f"fusedclip._C is not built ({_lib.LOAD_ERROR})")
    model = _model(wide=True)
    opt = _optimizer(optimizer, model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    module = _lib.module()
    fast_calls = []
    real = module.partial_into

    def counted(grad, *args):  # the hooks' one-call path, below the dispatcher
        fast_calls.append(grad.untyped_storage().data_ptr())
        return real(grad, *args)

    with mock.patch.object(module, "partial_into", counted):
        clipper = fusedclip.BackwardClipper(model, 0.05, optimizer=opt, scaler=scaler,
                                            backend="cpp")
    params = list(model.parameters())
    for step in range(2):
        fast_calls.clear()
        with _Recorder() as during:
            for x in _inputs(2, torch.float32, "cpu", seed=step):
                scaler.scale(model(x).pow(2).sum()).backward()
        ops = [c for c, _ in during.calls if c == "fusedclip::partials_"]
        assert len(ops) + len(fast_calls) == 2 * len(params)
        assert sorted(set(fast_calls)) == sorted(p.grad.untyped_storage().data_ptr()
                                                 for p in params)
        with _Recorder([p.grad for p in params], syncs=int(optimizer == "sgd")) as after:
            scaler.step(opt)
            scaler.update()
        touching = [c for c, touched in after.calls if touched]
        if optimizer == "sgd":
            # the pass that unscales and clips, then SGD's own update (read by the add)
            assert touching[0] == "fusedclip::scale_", touching
            assert touching.count("fusedclip::scale_") == 1
        else:
            assert touching == ["aten::_fused_adamw_"], touching
        assert any(c == "fusedclip::finish_partials" for c, _ in after.calls)
        assert after.syncs == 0
        opt.zero_grad()
    clipper.remove()
