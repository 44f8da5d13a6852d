"""The AMP path: unscale + inf/NaN check + norm + clip in the fused passes, the GradScaler
integration, and the fold into torch's fused optimizers.

Every backend runs them on every device of the conftest matrix (``backend`` x ``device``: CPU
tensors here, CUDA tensors too where a GPU is present), against the fp64 oracle and against
torch's own recipe (``scaler.unscale_`` + ``torch.nn.utils.clip_grad_norm_``) with a
``torch.amp.GradScaler`` of the same device. The ``gpu`` tests at the end check what only a GPU
can show: that the call never waits for the device.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from gradients import clone_params, grads, make_params, random_tensors
from oracle import (
    assert_bitwise_equal,
    assert_norm_close,
    clip_rtol,
    oracle_coef,
    oracle_norm,
    torch_or_skip,
    ulp_close,
)
from torch.amp.grad_scaler import OptState

import fusedclip
from fusedclip import _select
from fusedclip.backends.cpp import _lib

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

AMP_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = {
    "several": [5, 1, 4099, 0, 70000, 3],
    "one": [1],
    "odd": [17, 255, 65537, 4097],
}
# A power of two (as GradScaler keeps it) and one whose inverse is not exact in fp32.
INV_SCALES = [2.0**-14, 1 / 1000.0]
# Tests without a backend that still depend on where the tensors are.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _impl(name: str, tensors):
    """The backend object ``clip_grad_norm_(..., backend=name)`` would run ``tensors`` with."""
    return _select.select(_select.parse(name), tensors)


def _expected(tensors, inv: float, max_norm: float, norm_type: float):
    """The fp64 oracle: the norm of x * inv, and x * inv * min(1, max_norm / (norm + 1e-6)) (on
    the CPU)."""
    wide = [t.detach().double().cpu() * inv for t in tensors]
    norm = oracle_norm(wide, norm_type)
    coef = oracle_coef(max_norm, norm)
    return norm, [(w * coef).to(t.dtype) for w, t in zip(wide, tensors)]


def _assert_handed_factor(opt, scaled, inv: float, max_norm: float, user: float = 1.0):
    """``opt.grad_scale``, what the fused step divides every gradient by, against the oracle:
    ``user / (inv_scale * coef)`` for the gradients ``scaled`` as they were (still loss-scaled)
    and a ``grad_scale`` the user had set (1: none)."""
    norm = oracle_norm([g.detach().double().cpu() * inv for g in scaled], 2.0)
    want = user / (inv * oracle_coef(max_norm, norm))
    handed = opt.grad_scale
    assert handed.dtype == torch.float32 and handed.device == scaled[0].device
    # fp32 holds it to 6e-8; the coefficient's error is the norm's (fp64 sums: far below).
    torch.testing.assert_close(handed.double().cpu(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-6, atol=0)


# ---- the fused passes against the oracle ---------------------------------------------------------

@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 1.5])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("inv", INV_SCALES, ids=["pow2", "1/1000"])
def test_unscale_clip_matches_oracle(backend, device, dtype, norm_type, sizes, inv):
    scale = 1.0 / inv
    tensors = random_tensors(sizes, dtype, device, scale=min(scale, 2000.0))
    inv_t = torch.tensor(inv, dtype=torch.float32, device=device)
    inv_exact = float(inv_t)
    norm_exp, expected = _expected(tensors, inv_exact, 0.5, norm_type)
    found = torch.zeros((), device=device)
    norm = _impl(backend, tensors).clip_(tensors, 0.5, norm_type, inv_t, found)
    assert float(found) == 0.0
    assert norm.dtype == torch.float64 and norm.device == tensors[0].device
    # The fp64 norm, not rounded to the gradients' dtype: as close as two fp64 sums can be.
    torch.testing.assert_close(norm.double().cpu(), torch.tensor(norm_exp, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    for t, e in zip(tensors, expected):
        # Every element moved (the factor is far from 1), so matching proves it was written.
        ulp_close(t, e)


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_unscaled_norm_without_writing(backend, device, dtype, norm_type):
    tensors = random_tensors([300, 1, 65536 + 7], dtype, device, scale=1024.0)
    before = [t.clone() for t in tensors]
    found = torch.zeros((), device=device)
    inv = torch.tensor(2.0**-10, device=device)
    norm = _impl(backend, tensors).total_norm(tensors, norm_type, inv, found)
    expected = oracle_norm([t.double() * 2.0**-10 for t in before], norm_type)
    torch.testing.assert_close(norm.double().cpu(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert_bitwise_equal(tensors, before, nan_payloads=True)
    assert float(found) == 0.0


# Where the bad element goes: chunk 0 of the first tensor; the last element of the 70001-element
# one (its second chunk, in a partial tile); the last tensor. The flag comes from each chunk's
# largest magnitude, accumulated one of three ways: the plain sums (p = 1, 2 below fp64: inf or
# NaN passes through the sum), the scaled pair (p = 0.5, and every p in fp64: through the max),
# the max itself (p = inf). Each dtype runs every case, so inf, -inf and NaN meet each of them.
FOUND_INF_CASES = {
    "first-inf-p2": (0, math.inf, 2.0),
    "middle-nan-p1": (1, math.nan, 1.0),
    "last-(-inf)-p0.5": (2, -math.inf, 0.5),
    "last-nan-pinf": (2, math.nan, math.inf),
}


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("case", FOUND_INF_CASES.values(), ids=FOUND_INF_CASES.keys())
def test_found_inf_per_element(backend, device, dtype, case):
    where, bad, norm_type = case
    tensors = random_tensors([40, 70001, 9], dtype, device, scale=100.0)
    tensors[where][-1 if where == 1 else 3] = bad
    found = torch.zeros((), device=device)
    _impl(backend, tensors).total_norm(tensors, norm_type, torch.tensor(0.5, device=device),
                                       found)
    assert float(found) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_found_inf_is_per_element_not_the_norm(backend, device, dtype, norm_type):
    """Finite gradients near their dtype's largest value, whose norm overflows that dtype: torch
    returns an inf norm, but no element is inf, so the flag stays 0 (a check through the rounded
    norm would skip the step)."""
    top = torch.finfo(dtype).max
    tensors = [torch.full((64,), top * 0.9, dtype=dtype, device=device),
               torch.full((3,), -top, dtype=dtype, device=device)]
    found = torch.zeros((), device=device)
    norm = _impl(backend, tensors).total_norm(tensors, norm_type,
                                              torch.tensor(1.0, device=device), found)
    assert float(found) == 0.0
    assert math.isfinite(float(norm)) and float(norm) > top


def test_found_inf_is_never_cleared(backend, device):
    tensors = random_tensors([10, 20], torch.float32, device)
    found = torch.ones((), device=device)
    _impl(backend, tensors).clip_(tensors, 1.0, 2.0, torch.tensor(1.0, device=device), found)
    assert float(found) == 1.0


def test_inf_gives_torch_result(backend, device):
    """After an inf the gradients are what torch's recipe leaves: unscale, then times a zero
    coefficient (0 for finite elements, NaN for infinite ones)."""
    tensors = random_tensors([100, 5], torch.float32, device, scale=64.0)
    tensors[0][7] = math.inf
    twin = [t.clone() for t in tensors]
    found = torch.zeros((), device=device)
    inv = torch.tensor(1 / 64, device=device)
    _impl(backend, tensors).clip_(tensors, 1.0, 2.0, inv, found)
    torch._amp_foreach_non_finite_check_and_unscale_(twin, torch.zeros((), device=device), inv)
    torch.nn.utils.clip_grad_norm_([_param_with(t) for t in twin], 1.0)
    assert_bitwise_equal(tensors, twin)


def _param_with(grad):
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ops_take_inv_scale(backend, device, dtype):
    """The fused backends' operators themselves (``_select.get(name).ops``: one schema for
    ``cpp`` and ``triton``) with inv_scale/found_inf, against the oracle: the unscaled norm, the
    unscaled per-tensor norms, and every element unscaled and clipped."""
    if backend == "reference":
        pytest.skip("operators of the fused backends")
    tensors = random_tensors([1000, 3, 65540], dtype, device, scale=4096.0)
    before = [t.clone() for t in tensors]
    inv, found = torch.tensor(2.0**-12, device=device), torch.zeros((), device=device)
    norm, per = _select.get(backend).ops.clip(tensors, 1.0, 2.0, True, inv, found, False)
    norm_exp, expected = _expected(before, 2.0**-12, 1.0, 2.0)
    assert float(found) == 0.0
    assert norm.dtype == per.dtype == torch.float64 and per.shape == (3,)
    torch.testing.assert_close(norm.cpu(), torch.tensor(norm_exp, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    per_exp = [oracle_norm([t.double() * 2.0**-12], 2.0) for t in before]
    torch.testing.assert_close(per.cpu(), torch.tensor(per_exp, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    for t, e in zip(tensors, expected):
        ulp_close(t, e)


def test_op_argument_checks(backend, device):
    if backend == "reference":
        pytest.skip("operators of the fused backends")
    tensors = random_tensors([10], torch.float32, device)
    before = [t.clone() for t in tensors]
    impl = _impl(backend, tensors)
    for inv, found in [(torch.tensor(1.0, dtype=torch.float64), None),
                       (torch.ones(2), None),
                       (torch.tensor(1.0), torch.zeros((), dtype=torch.float64))]:
        with pytest.raises(RuntimeError, match="inv_scale|found_inf"):
            impl.clip_(tensors, 1.0, 2.0, inv.to(device), None if found is None
                       else found.to(device))
    assert_bitwise_equal(tensors, before)


# ---- GradScaler integration ----------------------------------------------------------------------

def _model(device, seed=0, width=32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, width), torch.nn.GELU(), torch.nn.Linear(width, width),
        torch.nn.GELU(), torch.nn.Linear(width, 4),
    ).to(device)


def _backward(model, scaler, step, inject=None):
    """A scaled fp16-autocast backward on the model's device; ``inject`` goes into one gradient."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 16, generator=gen).to(device)
    y = torch.randn(8, 4, generator=gen).to(device)
    with torch.autocast(device.type, dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y) * 10
    scaler.scale(loss).backward()
    if inject is not None:
        next(model.parameters()).grad.view(-1)[5] = inject
    return float(loss.detach())


def _scaler(device):
    return torch.amp.GradScaler(device, init_scale=2.0**14, growth_interval=4)


def _found(scaler, opt, device):
    """The found-inf flag GradScaler keeps for ``opt`` on ``device``, as a float."""
    return float(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"][
        torch.device(device, 0) if device == "cuda" else torch.device(device)])


def test_bf16_model_norm_is_float32_to_the_contract(backend, device):
    """A bf16 model's unscaled norm comes back as float32 within 1e-5 of the fp64 one (torch's
    recipe returns a bf16 norm), on the one-call path and on the general one."""
    for general in (False, True):
        model = _model(device).to(torch.bfloat16)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = _scaler(device)
        scale = scaler.scale(torch.ones((), device=device))  # creates the scale tensor
        for p in model.parameters():
            p.grad = torch.randn_like(p) * scale.to(p.dtype)
        unscaled = [p.grad.double() / float(scale) for p in model.parameters()]
        norm = fusedclip.clip_grad_norm_(list(model.parameters()), 1e9, scaler=scaler,
                                         optimizer=opt, backend=backend,
                                         error_if_nonfinite=general)
        assert norm.dtype == torch.float32
        assert_norm_close(norm, oracle_norm(unscaled, 2.0))


def test_scaler_state_after_call(backend, device):
    model = _model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = _scaler(device)
    _backward(model, scaler, 0)
    norm = fusedclip.clip_grad_norm_(model.parameters(), 0.1, scaler=scaler, optimizer=opt,
                                     backend=backend)
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"] is OptState.UNSCALED
    found = state["found_inf_per_device"]
    where = next(model.parameters()).device
    assert list(found) == [where]
    assert found[where].dtype == torch.float32 and found[where].device == where
    assert float(found[where]) == 0.0
    assert norm.dtype == torch.float32 and norm.device == where and float(norm) > 0.1
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        fusedclip.clip_grad_norm_(model.parameters(), 0.1, scaler=scaler, optimizer=opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        fusedclip.clip_grad_norm_(model.parameters(), 0.1, scaler=scaler, optimizer=opt)
    scaler.update()


def _recipe_twins(backend, device, make_opt, *, clip_all=True, inject=None, max_norm=0.05,
                  fold=False):
    """One step of torch's recipe and of the fused call from the same state: (model, optimizer,
    scaler, norm) of both, and the fused twin's gradients as they were before the call."""
    out = []
    for fused in (False, True):
        model = _model(device)
        opt = make_opt(model)
        scaler = _scaler(device)
        _backward(model, scaler, 0, inject=inject)
        scaled = [p.grad.clone() for p in model.parameters()]
        params = list(model.parameters()) if clip_all else list(model[2].parameters())
        if fused:
            norm = fusedclip.clip_grad_norm_(params, max_norm, scaler=scaler, optimizer=opt,
                                             fold_into_optimizer=fold, backend=backend)
        else:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        out.append((model, opt, scaler, norm))
    return out, scaled


def _close_params(a, b):
    """The parameters of two models after a step: one rounding apart through the optimizer."""
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def _close_grads(a, b, dtype=torch.float32):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=2 * clip_rtol(dtype), atol=1e-30,
                                   equal_nan=True)


@pytest.mark.parametrize("fold", [False, True], ids=["clip", "fold"])
def test_common_case_takes_the_one_call_path(backend, device, monkeypatch, fold):
    """One optimizer over exactly the clipped parameters: the C++ path (gradients read, plan
    checked and passes launched in one call) handles it, with the same result; the fold hands
    over the oracle's factor."""
    if backend == "reference" or not _lib.loaded():
        pytest.skip("the one-call path is the fused backends' with fusedclip._C")
    from fusedclip import amp

    def general(*args, **kwargs):
        raise AssertionError("took the general path")

    monkeypatch.setattr(amp, "_general", general)
    ((m0, _, _, n0), (m1, o1, s1, n1)), scaled = _recipe_twins(
        backend, device, lambda m: FUSED_OPTIMIZERS["adamw"](m.parameters()), fold=fold)
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=0)
    if fold:
        _assert_handed_factor(o1, scaled, 1 / s1.get_scale(), 0.05)
        assert_bitwise_equal([p.grad for p in m1.parameters()], scaled)
    else:
        _close_grads(m0, m1)


def test_matches_recipe_one_step(backend, device):
    ((m0, _, _, n0), (m1, _, _, n1)), _ = _recipe_twins(
        backend, device, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=0)
    assert float(n0) > 0.05  # the clip did scale
    _close_grads(m0, m1)


@pytest.mark.parametrize("fold", [False, True], ids=["clip", "fold"])
def test_clipping_grad_scaler_method(backend, device, fold):
    """The GradScaler subclass: same scale handling as torch's, and the method is the fused call
    (with ``fold_into_optimizer=True``, the fold: the factor handed to a fused SGD)."""
    results = []
    for fused in (False, True):
        model = _model(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=fold or None)
        scaler = fusedclip.ClippingGradScaler(device, init_scale=2.0**14, growth_interval=4)
        _backward(model, scaler, 0)
        if fused:
            scaled = [p.grad.clone() for p in model.parameters()]
            norm = scaler.unscale_and_clip_(opt, 0.05, fold_into_optimizer=fold, backend=backend)
            if fold:
                _assert_handed_factor(opt, scaled, 1 / scaler.get_scale(), 0.05)
        else:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
        results.append((model, norm, scaler.get_scale()))
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=0)
    assert results[1][2] == results[0][2]
    for p, q in zip(results[0][0].parameters(), results[1][0].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)


def test_subset_clip_unscales_the_rest(backend, device):
    """parameters a subset of the optimizer's: the rest is unscaled, not clipped, as by unscale_."""
    ((m0, _, _, n0), (m1, _, _, n1)), _ = _recipe_twins(
        backend, device, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), clip_all=False)
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=0)
    _close_grads(m0, m1)


def test_two_optimizers_have_their_own_flags(backend, device):
    """An inf among the second optimizer's gradients: torch's recipe steps the first and skips
    the second; so does the fused call."""
    results = []
    for fused in (False, True):
        model = _model(device)
        first = torch.optim.SGD(list(model[0].parameters()), lr=0.1)
        second = torch.optim.Adam(list(model[2].parameters()) + list(model[4].parameters()))
        scaler = _scaler(device)
        _backward(model, scaler, 0)
        model[2].weight.grad[1, 1] = math.inf
        if fused:
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler,
                                      optimizer=[first, second], backend=backend)
        else:
            scaler.unscale_(first)
            scaler.unscale_(second)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        flags = [_found(scaler, o, device) for o in (first, second)]
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(first)
        scaler.step(second)
        scaler.update()
        moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        results.append((flags, moved, scaler.get_scale()))
    assert results[0] == results[1]
    assert results[1][0] == [0.0, 1.0]


def test_inf_skips_step_and_backs_off(backend, device):
    model = _model(device)
    opt = torch.optim.Adam(model.parameters())
    scaler = _scaler(device)
    _backward(model, scaler, 0, inject=math.nan)
    before = [p.detach().clone() for p in model.parameters()]
    fusedclip.clip_grad_norm_(model.parameters(), 1.0, scaler=scaler, optimizer=opt,
                              backend=backend)
    scaler.step(opt)
    scaler.update()
    assert_bitwise_equal(list(model.parameters()), before)
    assert scaler.get_scale() == 2.0**13


def test_fp16_gradients_refused_like_torch(backend, device):
    params = make_params([(8,), (3, 3)], torch.float16, device)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = _scaler(device)
    scaler.scale(torch.ones((), device=device))  # initialises the scale, as scaler.scale(loss)
    before = [g.clone() for g in grads(params)]
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(opt)
    scaler = _scaler(device)
    scaler.scale(torch.ones((), device=device))
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        fusedclip.clip_grad_norm_(params, 1.0, scaler=scaler, optimizer=opt, backend=backend)
    assert_bitwise_equal(grads(params), before)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY


# Argument checks (before any backend is chosen): once, on the CPU.

def test_scaler_with_its_own_unscale_refused():
    """A GradScaler subclass whose unscale_ does more (FSDP's ShardedGradScaler all-reduces
    found_inf there) cannot be stood in for: a clear error, nothing touched."""

    class Reducing(torch.amp.GradScaler):
        def unscale_(self, optimizer):
            super().unscale_(optimizer)

    model = _model("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = Reducing("cpu")
    _backward(model, scaler, 0)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="overrides GradScaler.unscale_"):
        fusedclip.clip_grad_norm_(model.parameters(), 1.0, scaler=scaler, optimizer=opt)
    assert_bitwise_equal([p.grad for p in model.parameters()], before)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values", ["random", "duplicates-sum-to-inf"])
def test_sparse_gradients_with_scaler(device, values):
    """Sparse gradients (reference backend): unscaled, checked as stored (as torch's unscale_
    checks them, before duplicates are summed) and clipped like torch's recipe."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 4, sparse=True).to(device)
        opt = torch.optim.SGD(emb.parameters(), lr=0.1)
        scaler = _scaler(device)
        idx = torch.tensor([1, 3, 3, 7], device=device)
        scaler.scale(emb(idx).sum() * 1000).backward()
        if values != "random":
            big = torch.finfo(torch.float32).max
            emb.weight.grad = torch.sparse_coo_tensor(
                torch.tensor([[3, 3]]), torch.full((2, 4), big), (10, 4),
                check_invariants=True).to(device)
        if fused:
            norm = fusedclip.clip_grad_norm_(emb.parameters(), 0.5, scaler=scaler, optimizer=opt,
                                             backend="reference")
        else:
            scaler.unscale_(opt)
            norm = torch_or_skip(torch.nn.utils.clip_grad_norm_, emb.parameters(), 0.5)
        results.append((_found(scaler, opt, device), norm,
                        emb.weight.grad.coalesce().to_dense()))
    assert results[1][0] == results[0][0] == 0.0
    if values == "random":
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=0)
        torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-6, atol=0)


def test_unowned_gradients_refused(backend, device):
    model = _model(device)
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    scaler = _scaler(device)
    _backward(model, scaler, 0)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="no optimizer given owns"):
        fusedclip.clip_grad_norm_(model.parameters(), 1.0, scaler=scaler, optimizer=opt,
                                  backend=backend)
    assert_bitwise_equal([p.grad for p in model.parameters()], before)
    assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.READY


@pytest.mark.parametrize("kwargs, error", [
    (dict(optimizer=None), ValueError),
    (dict(optimizer="adam"), TypeError),
    (dict(scaler="scaler"), TypeError),
], ids=["no-optimizer", "not-an-optimizer", "not-a-scaler"])
def test_bad_arguments(kwargs, error):
    model = _model("cpu")
    scaler = _scaler("cpu")
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


def test_disabled_scaler_clips_as_usual(backend, device):
    params = make_params([(50,), (7, 7)], device=device)
    twin = clone_params(params)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler(device, enabled=False)
    norm = fusedclip.clip_grad_norm_(params, 0.5, scaler=scaler, optimizer=opt,
                                     backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(twin, 0.5)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    for a, b in zip(grads(params), grads(twin)):
        torch.testing.assert_close(a, b, rtol=2 * clip_rtol(torch.float32), atol=0)


def test_error_if_nonfinite_unscales_then_raises(backend, device):
    results = []
    for fused in (False, True):
        model = _model(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = _scaler(device)
        _backward(model, scaler, 0, inject=math.inf)
        with pytest.raises(RuntimeError, match="non-finite"):
            if fused:
                fusedclip.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True,
                                          scaler=scaler, optimizer=opt, backend=backend)
            else:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
        assert scaler._per_optimizer_states[id(opt)]["stage"] is OptState.UNSCALED
        results.append([p.grad.clone() for p in model.parameters()])
    assert_bitwise_equal(results[1], results[0])


def test_no_gradients(backend, device):
    """Nothing to unscale: as torch, the step then finds no inf checks recorded."""
    params = make_params([(4,)], device=device)
    params[0].grad = None
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = _scaler(device)
    scaler.scale(torch.ones((), device=device))
    norm = fusedclip.clip_grad_norm_(params, 1.0, scaler=scaler, optimizer=opt,
                                     backend=backend)
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


def test_fold_leaves_gradients_and_hands_over_factor(backend, device):
    model = _model(device)
    opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
    scaler = _scaler(device)
    _backward(model, scaler, 0)
    before = [p.grad.clone() for p in model.parameters()]
    norm = fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                                     fold_into_optimizer=True, backend=backend)
    assert_bitwise_equal([p.grad for p in model.parameters()], before)
    wide = [g.double() / scaler.get_scale() for g in before]
    expected_norm = oracle_norm(wide, 2.0)
    torch.testing.assert_close(norm.double().cpu(),
                               torch.tensor(expected_norm, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    _assert_handed_factor(opt, before, 1 / scaler.get_scale(), 0.05)
    scaler.step(opt)
    scaler.update()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("name", FUSED_OPTIMIZERS)
def test_fold_step_matches_recipe(backend, device, name):
    """The step from the folded factor is the recipe's step (a one-step Adam, AdamW or Adagrad
    barely sees the gradient's scale, so the factor is also checked against the oracle)."""
    models = []
    for fold in (False, True):
        model = _model(device)
        opt = FUSED_OPTIMIZERS[name](model.parameters())
        scaler = _scaler(device)
        _backward(model, scaler, 0)
        if fold and not getattr(opt, "_step_supports_amp_scaling", False):
            # torch 2.6's fused Adagrad takes no grad_scale (no _step_supports_amp_scaling): the
            # fold is refused, before anything is touched.
            before = [p.grad.clone() for p in model.parameters()]
            with pytest.raises(ValueError, match="needs optimizers that read grad_scale"):
                fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                                          fold_into_optimizer=True, backend=backend)
            assert_bitwise_equal([p.grad for p in model.parameters()], before)
            return
        if fold:
            scaled = [p.grad.clone() for p in model.parameters()]
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                                      fold_into_optimizer=True, backend=backend)
            _assert_handed_factor(opt, scaled, 1 / scaler.get_scale(), 0.05)
        else:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
        models.append(model)
    _close_params(*models)


def test_fold_skip_path(backend, device):
    """found_inf reaches the fused optimizer as exactly 1: the update and the step count skip."""
    model = _model(device)
    opt = FUSED_OPTIMIZERS["adam"](model.parameters())
    scaler = _scaler(device)
    _backward(model, scaler, 0, inject=math.inf)
    before = [p.detach().clone() for p in model.parameters()]
    fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                              fold_into_optimizer=True, backend=backend)
    scaler.step(opt)
    scaler.update()
    assert_bitwise_equal(list(model.parameters()), before)
    assert all(float(s["step"]) == 0.0 for s in opt.state.values())
    assert scaler.get_scale() == 2.0**13


def test_fold_without_scaler(backend, device):
    """No AMP: the clip coefficient alone is folded; a step hook removes grad_scale after."""
    models = []
    for fold in (False, True):
        model = _model(device)
        opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
        _backward(model, torch.amp.GradScaler(device, enabled=False), 0)
        if fold:
            before = [p.grad.clone() for p in model.parameters()]
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, optimizer=opt,
                                      fold_into_optimizer=True, backend=backend)
            _assert_handed_factor(opt, before, 1.0, 0.05)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        assert not hasattr(opt, "grad_scale")
        opt.step()  # a second step sees no stale factor
        models.append(model)
    _close_params(*models)


def test_fold_twice_before_step_does_not_compound(backend, device):
    """Without a scaler: a second call before the step replaces the factor (torch's clip would
    find nothing left to clip), and the step uses it once."""
    models = []
    for calls in (1, 2):
        model = _model(device)
        opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
        _backward(model, torch.amp.GradScaler(device, enabled=False), 0)
        for _ in range(calls):
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, optimizer=opt,
                                      fold_into_optimizer=True, backend=backend)
        models.append((model, opt.grad_scale.clone()))
        opt.step()
    assert torch.equal(models[0][1], models[1][1])
    for p, q in zip(models[0][0].parameters(), models[1][0].parameters()):
        assert torch.equal(p, q)


def test_fold_after_a_skipped_iteration_does_not_compound(backend, device):
    """With a scaler: an iteration that folds but never steps (then update()) leaves grad_scale
    behind; the next fold replaces it."""
    model = _model(device)
    opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
    scaler = _scaler(device)
    handed = []
    for _ in range(2):
        opt.zero_grad()
        _backward(model, scaler, 0)
        fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                                  fold_into_optimizer=True, backend=backend)
        handed.append(float(opt.grad_scale))
        scaler.update()
    torch.testing.assert_close(handed[1], handed[0], rtol=1e-6, atol=0)


def test_fold_keeps_a_grad_scale_the_user_set(backend, device):
    """Without a scaler: the factor handed over is the product of the user's grad_scale and the
    clip's, so the step divides the clipped gradients by the user's grad_scale (momentum SGD: its
    first step moves by lr * gradient, so it sees a wrong factor); the user's grad_scale is put
    back afterwards."""
    models = []
    for fold in (False, True):
        model = _model(device)
        opt = FUSED_OPTIMIZERS["sgd"](model.parameters())
        _backward(model, torch.amp.GradScaler(device, enabled=False), 0)
        user = torch.tensor(4.0, device=device)
        if fold:
            before = [p.grad.clone() for p in model.parameters()]
            opt.grad_scale = user
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, optimizer=opt,
                                      fold_into_optimizer=True, backend=backend)
            _assert_handed_factor(opt, before, 1.0, 0.05, user=4.0)
            opt.step()
            assert opt.grad_scale is user
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.grad_scale = user
            opt.step()
        models.append(model)
    _close_params(*models)


def test_fold_hook_leaves_other_step_hooks_alone(backend, device):
    """A step post-hook registered after the fold's own one still runs, step after step."""
    model = _model(device)
    opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
    calls = []
    for step in range(3):
        opt.zero_grad()
        _backward(model, torch.amp.GradScaler(device, enabled=False), step)
        fusedclip.clip_grad_norm_(model.parameters(), 0.05, optimizer=opt,
                                  fold_into_optimizer=True, backend=backend)
        if step == 0:
            opt.register_step_post_hook(lambda o, a, k: calls.append(len(calls)))
        opt.step()
        assert not hasattr(opt, "grad_scale")
    assert calls == [0, 1, 2]


def test_fold_with_two_optimizers(backend, device):
    models = []
    for fold in (False, True):
        model = _model(device)
        opts = [FUSED_OPTIMIZERS["adamw"](model[0].parameters()),
                FUSED_OPTIMIZERS["sgd"](list(model[2].parameters()) + list(model[4].parameters()))]
        scaler = _scaler(device)
        _backward(model, scaler, 0)
        if fold:
            scaled = [p.grad.clone() for p in model.parameters()]
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opts,
                                      fold_into_optimizer=True, backend=backend)
            # One factor (the global norm's) handed to both.
            for opt in opts:
                _assert_handed_factor(opt, scaled, 1 / scaler.get_scale(), 0.05)
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
    model = _model("cpu")
    opt = (torch.optim.AdamW(model.parameters()) if case == "not-fused"
           else FUSED_OPTIMIZERS["adamw"](model.parameters()))
    params = model.parameters() if case == "not-fused" else model[0].parameters()
    scaler = _scaler("cpu")
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
    model = _model(device, width=48)
    opt = make_opt(model.parameters())
    scaler = _scaler(device)
    losses, scales, skipped, norms = [], [], [], []
    for step in range(steps):
        opt.zero_grad()
        losses.append(_backward(model, scaler, step, INJECT.get(step)))
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
def test_training_matches_torch_recipe(backend, device, opt_name):
    make_opt, fold = OPTIMIZERS[opt_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = _train("torch", make_opt, fold, device=device)
        got = _train("fused", make_opt, fold, backend, device)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_many_tensors(backend, device, dtype):
    """5,000 tensors (a few empty) in one unscale + clip, an inf in one of them."""
    if (backend, device) == ("triton", "cpu"):
        pytest.skip("5,000 programs per pass take minutes in Triton's CPU interpreter")
    # (Smaller on the CPU, where the fp64 oracle's exact sum dominates the time.)
    sizes = [(i * 37) % (3001 if device == "cuda" else 301) for i in range(5000)]
    tensors = random_tensors(sizes, dtype, device, scale=512.0)
    tensors[4321].view(-1)[-1] = math.inf if tensors[4321].numel() else 0.0
    norm_exp, expected = _expected(tensors, 1 / 512, 1.0, 2.0)
    found = torch.zeros((), device=device)
    _impl(backend, tensors).clip_(tensors, 1.0, 2.0, torch.tensor(1 / 512, device=device), found)
    assert float(found) == (1.0 if tensors[4321].numel() else 0.0)
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t.cpu(), e.cpu(), rtol=clip_rtol(dtype), atol=0,
                                   equal_nan=True)


# ---- GPU only: no host synchronization -----------------------------------------------------------

def _runs_cuda(backend):
    status = fusedclip.available_backends()[backend]
    if not status.runs_on("cuda"):
        pytest.skip(f"backend {backend} cannot run CUDA tensors here: {status.reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("fold", [False, True], ids=["clip", "fold"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_no_host_sync_cuda(backend, fold):
    """The AMP call never waits for the device (after a first call has built the plan)."""
    _runs_cuda(backend)
    model = _model("cuda")
    opt = FUSED_OPTIMIZERS["adamw"](model.parameters())
    scaler = _scaler("cuda")
    for step in range(2):
        opt.zero_grad()
        _backward(model, scaler, step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            fusedclip.clip_grad_norm_(model.parameters(), 0.05, scaler=scaler, optimizer=opt,
                                      fold_into_optimizer=fold, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.step(opt)
        scaler.update()
