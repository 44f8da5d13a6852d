"""The AMP path: unscale + inf/NaN check + norm + clip in the fused passes, the GradScaler
integration, and the fold into torch's fused optimizers.

Everything runs on the CPU through every CPU backend (the reference, the Triton kernels in the
interpreter, and the CUDA engine's CPU operators), against an fp64 oracle and against torch's own
recipe (``scaler.unscale_`` + ``torch.nn.utils.clip_grad_norm_``) with
``torch.amp.GradScaler("cpu")``.
The ``gpu`` tests repeat the training comparison on CUDA with the cuda and triton backends.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import (
    assert_bitwise_equal,
    clip_rtol,
    clone_params,
    grads,
    make_params,
    oracle_norm,
    random_tensors,
    rtol_for,
)
from torch.amp.grad_scaler import OptState

import fusedclip
from fusedclip import backends

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

AMP_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = {
    "several": [5, 1, 4099, 0, 70000, 3],
    "one": [1],
    "odd": [17, 255, 65537, 4097],
}
# A power of two (as GradScaler keeps it) and one whose inverse is not exact in fp32.
INV_SCALES = [2.0**-14, 1 / 1000.0]


def _impl(name: str, tensors):
    return backends.select(name, tensors)


def _expected(tensors, inv: float, max_norm: float, norm_type: float):
    """The fp64 oracle: the norm of x * inv, and x * inv * min(1, max_norm / (norm + 1e-6))."""
    wide = [t.double() * inv for t in tensors]
    norm = oracle_norm(wide, norm_type)
    coef = min(1.0, max_norm / (norm + 1e-6)) if not math.isnan(norm) else math.nan
    return norm, [(w * coef).to(t.dtype) for w, t in zip(wide, tensors)]


# ---- the fused passes against the oracle ---------------------------------------------------------

@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 1.5])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("inv", INV_SCALES, ids=["pow2", "1/1000"])
def test_unscale_clip_matches_oracle(cpu_backend, dtype, norm_type, sizes, inv):
    scale = 1.0 / inv
    tensors = random_tensors(sizes, dtype, scale=min(scale, 2000.0))
    inv_t = torch.tensor(inv, dtype=torch.float32)
    inv_exact = float(inv_t)
    norm_exp, expected = _expected(tensors, inv_exact, 0.5, norm_type)
    found = torch.zeros(())
    norm = _impl(cpu_backend, tensors).clip_(tensors, 0.5, norm_type, inv_t, found)
    assert float(found) == 0.0
    # The fp64 norm, not rounded to the gradients' dtype: as close as two fp64 sums can be.
    torch.testing.assert_close(norm.double(), torch.tensor(norm_exp, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    for t, e in zip(tensors, expected):
        # Every element moved (the factor is far from 1), so matching proves it was written.
        fi = torch.finfo(dtype)
        torch.testing.assert_close(t, e, rtol=clip_rtol(dtype), atol=fi.tiny * fi.eps)


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_unscaled_norm_without_writing(cpu_backend, dtype, norm_type):
    tensors = random_tensors([300, 1, 65536 + 7], dtype, scale=1024.0)
    before = [t.clone() for t in tensors]
    found = torch.zeros(())
    inv = torch.tensor(2.0**-10)
    norm = _impl(cpu_backend, tensors).total_norm(tensors, norm_type, inv, found)
    expected = oracle_norm([t.double() * 2.0**-10 for t in before], norm_type)
    torch.testing.assert_close(norm.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=rtol_for(torch.float64), atol=0)
    assert_bitwise_equal(tensors, before, nan_payloads=True)
    assert float(found) == 0.0


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.5])
def test_found_inf_per_element(cpu_backend, dtype, bad, where, norm_type):
    tensors = random_tensors([40, 70001, 9], dtype, scale=100.0)
    tensors[where][-1 if where == 1 else 3] = bad
    found = torch.zeros(())
    _impl(cpu_backend, tensors).total_norm(tensors, norm_type, torch.tensor(0.5), found)
    assert float(found) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_found_inf_is_per_element_not_the_norm(cpu_backend, dtype, norm_type):
    """Finite gradients near their dtype's largest value, whose norm overflows that dtype: torch
    returns an inf norm, but no element is inf, so the flag stays 0 (a check through the rounded
    norm would skip the step)."""
    top = torch.finfo(dtype).max
    tensors = [torch.full((64,), top * 0.9, dtype=dtype), torch.full((3,), -top, dtype=dtype)]
    found = torch.zeros(())
    norm = _impl(cpu_backend, tensors).total_norm(tensors, norm_type, torch.tensor(1.0), found)
    assert float(found) == 0.0
    assert math.isfinite(float(norm)) and float(norm) > top


def test_found_inf_is_never_cleared(cpu_backend):
    tensors = random_tensors([10, 20], torch.float32)
    found = torch.ones(())
    _impl(cpu_backend, tensors).clip_(tensors, 1.0, 2.0, torch.tensor(1.0), found)
    assert float(found) == 1.0


def test_inf_gives_torch_result(cpu_backend):
    """After an inf the gradients are what torch's recipe leaves: unscale, then times a zero
    coefficient (0 for finite elements, NaN for infinite ones)."""
    tensors = random_tensors([100, 5], torch.float32, scale=64.0)
    tensors[0][7] = math.inf
    twin = [t.clone() for t in tensors]
    found = torch.zeros(())
    _impl(cpu_backend, tensors).clip_(tensors, 1.0, 2.0, torch.tensor(1 / 64), found)
    torch._amp_foreach_non_finite_check_and_unscale_(twin, torch.zeros(()), torch.tensor(1 / 64))
    torch.nn.utils.clip_grad_norm_([_param_with(t) for t in twin], 1.0)
    assert_bitwise_equal(tensors, twin)


def _param_with(grad):
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ops_take_inv_scale(cpu_backend, dtype):
    """The operators of both fused backends with inv_scale/found_inf, against the reference."""
    if cpu_backend == "reference":
        pytest.skip("operators of the fused backends")
    tensors = random_tensors([1000, 3, 65540], dtype, scale=4096.0)
    twin = [t.clone() for t in tensors]
    inv, found, found_ref = torch.tensor(2.0**-12), torch.zeros(()), torch.zeros(())
    impl = _impl(cpu_backend, tensors)
    norm = impl.clip_(tensors, 1.0, 2.0, inv, found)
    expected = fusedclip.reference.clip_(twin, 1.0, 2.0, inv, found_ref)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for t, e in zip(tensors, twin):
        torch.testing.assert_close(t, e, rtol=clip_rtol(dtype), atol=0)


def test_op_argument_checks(cpu_backend):
    if cpu_backend == "reference":
        pytest.skip("operators of the fused backends")
    tensors = random_tensors([10], torch.float32)
    before = [t.clone() for t in tensors]
    impl = _impl(cpu_backend, tensors)
    for inv, found in [(torch.tensor(1.0, dtype=torch.float64), None),
                       (torch.ones(2), None),
                       (torch.tensor(1.0), torch.zeros((), dtype=torch.float64))]:
        with pytest.raises(RuntimeError, match="inv_scale|found_inf"):
            impl.clip_(tensors, 1.0, 2.0, inv, found)
    assert_bitwise_equal(tensors, before)


# ---- GradScaler integration ----------------------------------------------------------------------

def _model(seed=0, width=32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, width), torch.nn.GELU(), torch.nn.Linear(width, width),
        torch.nn.GELU(), torch.nn.Linear(width, 4),
    )


def _backward(model, scaler, step, device="cpu", inject=None):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 16, generator=gen).to(device)
    y = torch.randn(8, 4, generator=gen).to(device)
    with torch.autocast(device, dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y) * 10
    scaler.scale(loss).backward()
    if inject is not None:
        next(model.parameters()).grad.view(-1)[5] = inject
    return float(loss.detach())


def _scaler(device="cpu"):
    return torch.amp.GradScaler(device, init_scale=2.0**14, growth_interval=4)


def test_scaler_state_after_call(cpu_backend):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = _scaler()
    _backward(model, scaler, 0)
    norm = fusedclip.clip_grad_norm_(model.parameters(), 0.1, scaler=scaler, optimizer=opt,
                                     backend=cpu_backend)
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"] is OptState.UNSCALED
    found = state["found_inf_per_device"]
    assert list(found) == [torch.device("cpu")]
    assert found[torch.device("cpu")].dtype == torch.float32
    assert float(found[torch.device("cpu")]) == 0.0
    assert norm.dtype == torch.float32 and float(norm) > 0.1
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        fusedclip.clip_grad_norm_(model.parameters(), 0.1, scaler=scaler, optimizer=opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        fusedclip.clip_grad_norm_(model.parameters(), 0.1, scaler=scaler, optimizer=opt)
    scaler.update()


def _recipe_twins(cpu_backend, make_opt, *, clip_all=True, inject=None, max_norm=0.05,
                  fold=False):
    """One step of torch's recipe and of the fused call from the same state: both models."""
    out = []
    for fused in (False, True):
        model = _model()
        opt = make_opt(model)
        scaler = _scaler()
        _backward(model, scaler, 0, inject=inject)
        params = list(model.parameters()) if clip_all else list(model[2].parameters())
        if fused:
            norm = fusedclip.clip_grad_norm_(params, max_norm, scaler=scaler, optimizer=opt,
                                             fold_into_optimizer=fold, backend=cpu_backend)
        else:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        out.append((model, opt, scaler, norm))
    return out


def _close_params(a, b):
    """The parameters of two models after a step: one rounding apart through the optimizer."""
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def _close_grads(a, b, dtype=torch.float32):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=2 * clip_rtol(dtype), atol=1e-30,
                                   equal_nan=True)


@pytest.mark.parametrize("fold", [False, True], ids=["clip", "fold"])
def test_common_case_takes_the_one_call_path(cpu_backend, monkeypatch, fold):
    """One optimizer over exactly the clipped parameters: the C++ path (gradients read, plan
    checked and passes launched in one call) handles it, with the same result."""
    if cpu_backend == "reference" or not fusedclip._extension.loaded():
        pytest.skip("the one-call path is the fused backends' with fusedclip._C")
    from fusedclip import amp

    def general(*args, **kwargs):
        raise AssertionError("took the general path")

    monkeypatch.setattr(amp, "_general", general)
    (m0, _, _, n0), (m1, o1, _, n1) = _recipe_twins(
        cpu_backend, lambda m: FUSED_OPTIMIZERS["adamw"](m.parameters()), fold=fold)
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=0)
    if fold:
        assert o1.grad_scale.dtype == torch.float32
    else:
        _close_grads(m0, m1)


def test_matches_recipe_one_step(cpu_backend):
    (m0, _, s0, n0), (m1, _, s1, n1) = _recipe_twins(
        cpu_backend, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=0)
    assert float(n0) > 0.05  # the clip did scale
    _close_grads(m0, m1)


def test_clipping_grad_scaler_method(cpu_backend):
    """The GradScaler subclass: same scale handling as torch's, and the method is the fused call."""
    results = []
    for fused in (False, True):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = fusedclip.ClippingGradScaler("cpu", init_scale=2.0**14, growth_interval=4)
        _backward(model, scaler, 0)
        if fused:
            norm = scaler.unscale_and_clip_(opt, 0.05, backend=cpu_backend)
        else:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
        results.append((model, norm))
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=0)
    for p, q in zip(results[0][0].parameters(), results[1][0].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)


def test_subset_clip_unscales_the_rest(cpu_backend):
    """parameters a subset of the optimizer's: the rest is unscaled, not clipped, as by unscale_."""
    (m0, _, _, n0), (m1, _, _, n1) = _recipe_twins(
        cpu_backend, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), clip_all=False)
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=0)
    _close_grads(m0, m1)


def test_two_optimizers_have_their_own_flags(cpu_backend):
    """An inf among the second optimizer's gradients: torch's recipe steps the first and skips
    the second; so does the fused call."""
    results = []
    for fused in (False, True):
        model = _model()
        first = torch.optim.SGD(list(model[0].parameters()), lr=0.1)
        second = torch.optim.Adam(list(model[2].parameters()) + list(model[4].parameters()))
        scaler = _scaler()
        _backward(model, scaler, 0)
        model[2].weight.grad[1, 1] = math.inf
        if fused:
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler,
                                      optimizer=[first, second], backend=cpu_backend)
        else:
            scaler.unscale_(first)
            scaler.unscale_(second)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        flags = [float(scaler._per_optimizer_states[id(o)]["found_inf_per_device"][
            torch.device("cpu")]) for o in (first, second)]
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(first)
        scaler.step(second)
        scaler.update()
        moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        results.append((flags, moved, scaler.get_scale()))
    assert results[0] == results[1]
    assert results[1][0] == [0.0, 1.0]


def test_inf_skips_step_and_backs_off(cpu_backend):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    scaler = _scaler()
    _backward(model, scaler, 0, inject=math.nan)
    before = [p.detach().clone() for p in model.parameters()]
    fusedclip.clip_grad_norm_(model.parameters(), 1.0, scaler=scaler, optimizer=opt,
                              backend=cpu_backend)
    scaler.step(opt)
    scaler.update()
    assert_bitwise_equal(list(model.parameters()), before)
    assert scaler.get_scale() == 2.0**13


def test_fp16_gradients_refused_like_torch(cpu_backend):
    params = make_params([(8,), (3, 3)], dtype=torch.float16)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = _scaler()
    scaler.scale(torch.ones(()))  # initialises the scale, as scaler.scale(loss) does
    before = [g.clone() for g in grads(params)]
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(opt)
    scaler = _scaler()
    scaler.scale(torch.ones(()))
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        fusedclip.clip_grad_norm_(params, 1.0, scaler=scaler, optimizer=opt, backend=cpu_backend)
    assert_bitwise_equal(grads(params), before)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY


def test_scaler_with_its_own_unscale_refused():
    """A GradScaler subclass whose unscale_ does more (FSDP's ShardedGradScaler all-reduces
    found_inf there) cannot be stood in for: a clear error, nothing touched."""

    class Reducing(torch.amp.GradScaler):
        def unscale_(self, optimizer):
            super().unscale_(optimizer)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = Reducing("cpu")
    _backward(model, scaler, 0)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="overrides GradScaler.unscale_"):
        fusedclip.clip_grad_norm_(model.parameters(), 1.0, scaler=scaler, optimizer=opt)
    assert_bitwise_equal([p.grad for p in model.parameters()], before)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY


@pytest.mark.parametrize("values", ["random", "duplicates-sum-to-inf"])
def test_sparse_gradients_with_scaler(values):
    """Sparse gradients (reference backend): unscaled, checked as stored (as torch's unscale_
    checks them, before duplicates are summed) and clipped like torch's recipe."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 4, sparse=True)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        scaler = _scaler()
        idx = torch.tensor([1, 3, 3, 7])
        scaler.scale(emb(idx).sum() * 1000).backward()
        if values != "random":
            big = torch.finfo(torch.float32).max
            emb.weight.grad = torch.sparse_coo_tensor(
                torch.tensor([[3, 3]]), torch.full((2, 4), big), (10, 4), check_invariants=True)
        if fused:
            norm = fusedclip.clip_grad_norm_(emb.parameters(), 0.5, scaler=scaler, optimizer=opt,
                                             backend="reference")
        else:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(emb.parameters(), 0.5)
        found = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
        results.append((float(found[torch.device("cpu")]), norm,
                        emb.weight.grad.coalesce().to_dense()))
    assert results[1][0] == results[0][0] == 0.0
    if values == "random":
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=0)
        torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-6, atol=0)


def test_unowned_gradients_refused(cpu_backend):
    model = _model()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    scaler = _scaler()
    _backward(model, scaler, 0)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="no optimizer given owns"):
        fusedclip.clip_grad_norm_(model.parameters(), 1.0, scaler=scaler, optimizer=opt,
                                  backend=cpu_backend)
    assert_bitwise_equal([p.grad for p in model.parameters()], before)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY


@pytest.mark.parametrize("kwargs, error", [
    (dict(optimizer=None), ValueError),
    (dict(optimizer="adam"), TypeError),
    (dict(scaler="scaler"), TypeError),
], ids=["no-optimizer", "not-an-optimizer", "not-a-scaler"])
def test_bad_arguments(kwargs, error):
    model = _model()
    scaler = _scaler()
    _backward(model, scaler, 0)
    before = [p.grad.clone() for p in model.parameters()]
    args = dict(scaler=scaler, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    args.update(kwargs)
    with pytest.raises(error):
        fusedclip.clip_grad_norm_(model.parameters(), 1.0, **args)
    assert_bitwise_equal([p.grad for p in model.parameters()], before)


def test_optimizer_without_scaler_or_fold_refused():
    params = make_params([(4,)])
    with pytest.raises(ValueError, match="optimizer= is for"):
        fusedclip.clip_grad_norm_(params, 1.0, optimizer=torch.optim.SGD(params, lr=0.1))


def test_disabled_scaler_clips_as_usual(cpu_backend):
    params = make_params([(50,), (7, 7)])
    twin = clone_params(params)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    norm = fusedclip.clip_grad_norm_(params, 0.5, scaler=scaler, optimizer=opt,
                                     backend=cpu_backend)
    expected = torch.nn.utils.clip_grad_norm_(twin, 0.5)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    for a, b in zip(grads(params), grads(twin)):
        torch.testing.assert_close(a, b, rtol=2 * clip_rtol(torch.float32), atol=0)


def test_error_if_nonfinite_unscales_then_raises(cpu_backend):
    results = []
    for fused in (False, True):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = _scaler()
        _backward(model, scaler, 0, inject=math.inf)
        with pytest.raises(RuntimeError, match="non-finite"):
            if fused:
                fusedclip.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True,
                                          scaler=scaler, optimizer=opt, backend=cpu_backend)
            else:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
        assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED
        results.append([p.grad.clone() for p in model.parameters()])
    assert_bitwise_equal(results[1], results[0])


def test_no_gradients(cpu_backend):
    """Nothing to unscale: as torch, the step then finds no inf checks recorded."""
    params = make_params([(4,)])
    params[0].grad = None
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = _scaler()
    scaler.scale(torch.ones(()))
    norm = fusedclip.clip_grad_norm_(params, 1.0, scaler=scaler, optimizer=opt,
                                     backend=cpu_backend)
    assert float(norm) == 0.0
    with pytest.raises(AssertionError, match="No inf checks"):
        scaler.step(opt)


# ---- the fold into fused optimizers --------------------------------------------------------------

FUSED_OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True),
}


def test_fold_leaves_gradients_and_hands_over_factor(cpu_backend):
    model = _model()
    opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
    scaler = _scaler()
    _backward(model, scaler, 0)
    before = [p.grad.clone() for p in model.parameters()]
    norm = fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                                     fold_into_optimizer=True, backend=cpu_backend)
    assert_bitwise_equal([p.grad for p in model.parameters()], before)
    wide = [g.double() / scaler.get_scale() for g in before]
    expected_norm = oracle_norm(wide, 2.0)
    torch.testing.assert_close(norm.double(), torch.tensor(expected_norm, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    factor = min(1.0, 0.05 / (expected_norm + 1e-6)) / scaler.get_scale()
    torch.testing.assert_close(opt.grad_scale.double(), torch.tensor(1 / factor).double(),
                               rtol=1e-6, atol=0)
    scaler.step(opt)
    scaler.update()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("name", FUSED_OPTIMIZERS)
def test_fold_step_matches_recipe(cpu_backend, name):
    models = []
    for fold in (False, True):
        model = _model()
        opt = FUSED_OPTIMIZERS[name](model.parameters())
        scaler = _scaler()
        _backward(model, scaler, 0)
        if fold:
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                                      fold_into_optimizer=True, backend=cpu_backend)
        else:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
        models.append(model)
    _close_params(*models)


def test_fold_skip_path(cpu_backend):
    """found_inf reaches the fused optimizer as exactly 1: the update and the step count skip."""
    model = _model()
    opt = FUSED_OPTIMIZERS["adam"](model.parameters())
    scaler = _scaler()
    _backward(model, scaler, 0, inject=math.inf)
    before = [p.detach().clone() for p in model.parameters()]
    fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                              fold_into_optimizer=True, backend=cpu_backend)
    scaler.step(opt)
    scaler.update()
    assert_bitwise_equal(list(model.parameters()), before)
    assert all(float(s["step"]) == 0.0 for s in opt.state.values())
    assert scaler.get_scale() == 2.0**13


def test_fold_without_scaler(cpu_backend):
    """No AMP: the clip coefficient alone is folded; a step hook removes grad_scale after."""
    models = []
    for fold in (False, True):
        model = _model()
        opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
        _backward(model, torch.amp.GradScaler("cpu", enabled=False), 0)
        if fold:
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, optimizer=opt,
                                      fold_into_optimizer=True, backend=cpu_backend)
            assert opt.grad_scale.dtype == torch.float32
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        assert not hasattr(opt, "grad_scale")
        opt.step()  # a second step sees no stale factor
        models.append(model)
    _close_params(*models)


def test_fold_twice_before_step_does_not_compound(cpu_backend):
    """Without a scaler: a second call before the step replaces the factor (torch's clip would
    find nothing left to clip), and the step uses it once."""
    models = []
    for calls in (1, 2):
        model = _model()
        opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
        _backward(model, torch.amp.GradScaler("cpu", enabled=False), 0)
        for _ in range(calls):
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, optimizer=opt,
                                      fold_into_optimizer=True, backend=cpu_backend)
        models.append((model, opt.grad_scale.clone()))
        opt.step()
    assert torch.equal(models[0][1], models[1][1])
    for p, q in zip(models[0][0].parameters(), models[1][0].parameters()):
        assert torch.equal(p, q)


def test_fold_after_a_skipped_iteration_does_not_compound(cpu_backend):
    """With a scaler: an iteration that folds but never steps (then update()) leaves grad_scale
    behind; the next fold replaces it."""
    model = _model()
    opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
    scaler = _scaler()
    handed = []
    for _ in range(2):
        opt.zero_grad()
        _backward(model, scaler, 0)
        fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                                  fold_into_optimizer=True, backend=cpu_backend)
        handed.append(float(opt.grad_scale))
        scaler.update()
    torch.testing.assert_close(handed[1], handed[0], rtol=1e-6, atol=0)


def test_fold_keeps_a_grad_scale_the_user_set(cpu_backend):
    """Without a scaler: the step divides the clipped gradients by the user's grad_scale (the
    factor handed over is the product), and the user's grad_scale is put back afterwards."""
    models = []
    for fold in (False, True):
        model = _model()
        opt = FUSED_OPTIMIZERS["adam"](model.parameters())
        _backward(model, torch.amp.GradScaler("cpu", enabled=False), 0)
        user = torch.tensor(4.0)
        if fold:
            opt.grad_scale = user
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, optimizer=opt,
                                      fold_into_optimizer=True, backend=cpu_backend)
            opt.step()
            assert opt.grad_scale is user
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.grad_scale = user
            opt.step()
        models.append(model)
    _close_params(*models)


def test_fold_hook_leaves_other_step_hooks_alone(cpu_backend):
    """A step post-hook registered after the fold's own one still runs, step after step."""
    model = _model()
    opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
    calls = []
    for step in range(3):
        opt.zero_grad()
        _backward(model, torch.amp.GradScaler("cpu", enabled=False), step)
        fusedclip.clip_grad_norm_(model.parameters(), 0.05, optimizer=opt,
                                  fold_into_optimizer=True, backend=cpu_backend)
        if step == 0:
            opt.register_step_post_hook(lambda o, a, k: calls.append(len(calls)))
        opt.step()
        assert not hasattr(opt, "grad_scale")
    assert calls == [0, 1, 2]


def test_fold_with_two_optimizers(cpu_backend):
    models = []
    for fold in (False, True):
        model = _model()
        opts = [FUSED_OPTIMIZERS["adamw"](model[0].parameters()),
                FUSED_OPTIMIZERS["sgd"](list(model[2].parameters()) + list(model[4].parameters()))]
        scaler = _scaler()
        _backward(model, scaler, 0)
        if fold:
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opts,
                                      fold_into_optimizer=True, backend=cpu_backend)
        else:
            for opt in opts:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        for opt in opts:
            scaler.step(opt)
        scaler.update()
        models.append(model)
    _close_params(*models)


@pytest.mark.parametrize("case", ["not-fused", "subset"])
def test_fold_refusals(case):
    model = _model()
    opt = (torch.optim.AdamW(model.parameters()) if case == "not-fused"
           else FUSED_OPTIMIZERS["adamw"](model.parameters()))
    params = model.parameters() if case == "not-fused" else model[0].parameters()
    scaler = _scaler()
    _backward(model, scaler, 0)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="fold_into_optimizer"):
        fusedclip.clip_grad_norm_(params, 1.0, scaler=scaler, optimizer=opt,
                                  fold_into_optimizer=True)
    assert_bitwise_equal([p.grad for p in model.parameters()], before)
    assert not hasattr(opt, "grad_scale")


# ---- end to end: tens of steps of fp16 AMP training ----------------------------------------------

OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), False),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-3), False),
    "adamw-fused": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), False),
    "adamw-fused-fold": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), True),
    "sgd-fused-fold": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True), True),
}
INJECT = {7: math.inf, 13: math.nan, 21: -math.inf}


def _train(mode, make_opt, fold, backend=None, device="cpu", steps=30, max_norm=0.5):
    """(losses, scales, skipped steps, norms, final parameters) of a run."""
    model = _model(width=48).to(device)
    opt = make_opt(model.parameters())
    scaler = _scaler(device)
    losses, scales, skipped, norms = [], [], [], []
    for step in range(steps):
        opt.zero_grad()
        losses.append(_backward(model, scaler, step, device, INJECT.get(step)))
        before = next(model.parameters()).detach().clone()
        if mode == "torch":
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        elif mode == "fused":
            norm = fusedclip.clip_grad_norm_(model.parameters(), max_norm, scaler=scaler,
                                             optimizer=opt, fold_into_optimizer=fold,
                                             backend=backend)
        else:  # "unclipped": the control that shows the clip matters
            scaler.unscale_(opt)
            norm = torch.zeros(())
        scaler.step(opt)
        scaler.update()
        norms.append(float(norm))
        skipped.append(torch.equal(before, next(model.parameters()).detach()))
        scales.append(scaler.get_scale())
    return losses, scales, skipped, norms, [p.detach().cpu() for p in model.parameters()]


def _assert_same_training(ref, got):
    losses0, scales0, skipped0, norms0, params0 = ref
    losses1, scales1, skipped1, norms1, params1 = got
    assert scales1 == scales0
    assert skipped1 == skipped0
    torch.testing.assert_close(torch.tensor(losses1), torch.tensor(losses0), rtol=1e-4, atol=0)
    finite = [i for i, n in enumerate(norms0) if math.isfinite(n)]
    torch.testing.assert_close(torch.tensor([norms1[i] for i in finite]),
                               torch.tensor([norms0[i] for i in finite]), rtol=1e-4, atol=0)
    for p, q in zip(params0, params1):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_training_matches_torch_recipe(cpu_backend, opt_name):
    make_opt, fold = OPTIMIZERS[opt_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = _train("torch", make_opt, fold)
        got = _train("fused", make_opt, fold, cpu_backend)
    _assert_same_training(ref, got)
    skipped = [i for i, s in enumerate(ref[2]) if s]
    assert set(INJECT) <= set(skipped)  # every injected inf skipped its step
    assert sum(n > 0.5 for n in ref[3] if math.isfinite(n)) >= 5  # the clip was active


def test_training_comparison_can_fail():
    """The comparison tells clipped from unclipped training apart (it is not vacuous)."""
    make_opt, fold = OPTIMIZERS["adam"]
    ref = _train("torch", make_opt, fold)
    control = _train("unclipped", make_opt, fold)
    with pytest.raises(AssertionError):
        _assert_same_training(ref, control)


# ---- GPU -----------------------------------------------------------------------------------------

def _gpu_backends():
    return [name for name in ("cuda", "triton") if fusedclip.available_backends()[name].available]


@pytest.mark.gpu
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_training_matches_torch_recipe_cuda(backend, opt_name):
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} unavailable")
    make_opt, fold = OPTIMIZERS[opt_name]
    ref = _train("torch", make_opt, fold, device="cuda")
    got = _train("fused", make_opt, fold, backend, device="cuda")
    _assert_same_training(ref, got)


@pytest.mark.gpu
@pytest.mark.parametrize("fold", [False, True], ids=["clip", "fold"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync_cuda(backend, fold):
    """The AMP call never waits for the device (after a first call has built the plan)."""
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} unavailable")
    model = _model().cuda()
    opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
    scaler = _scaler("cuda")
    for step in range(2):
        opt.zero_grad()
        _backward(model, scaler, step, "cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                                      fold_into_optimizer=fold, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.step(opt)
        scaler.update()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_many_tensors_cuda(backend, dtype):
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} unavailable")
    tensors = random_tensors([(i * 37) % 3001 for i in range(5000)], dtype, "cuda", scale=512.0)
    tensors[4321].view(-1)[-1] = math.inf if tensors[4321].numel() else 0.0
    norm_exp, expected = _expected(tensors, 1 / 512, 1.0, 2.0)
    found = torch.zeros((), device="cuda")
    backends.select(backend, tensors).clip_(tensors, 1.0, 2.0,
                                            torch.tensor(1 / 512, device="cuda"), found)
    assert float(found) == (1.0 if tensors[4321].numel() else 0.0)
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t.cpu(), e.cpu(), rtol=clip_rtol(dtype), atol=0,
                                   equal_nan=True)
