"""Clipping modes and monitoring: value clipping in one pass, soft and per-tensor clipping,
``return_stats`` and ``StatsWindow``, ``AutoClipper``.

Every CPU backend runs them (the reference, the Triton kernels in the interpreter, the CUDA
engine's CPU operators), against torch where torch has the operation and an fp64 oracle where it
does not.
"""

from __future__ import annotations

import math

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

import fusedclip
from fusedclip import backends

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(5,), (1,), (0,), (70001,), (33, 17), (4099,)]


def _params(dtype, layout="contiguous", seed=0, scale=1.0):
    params = make_params(SHAPES, dtype=dtype, seed=seed, layout=layout)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    return params


# ---- value clipping ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip_value", [0.0, 1e-3, 0.5, 1.005, math.inf])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset"])
def test_clip_grad_value_bitwise_torch(cpu_backend, dtype, clip_value, layout):
    params = _params(dtype, layout)
    # inf, -inf, NaN and both zeros: clamped, clamped, kept, kept with their sign.
    specials = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0], dtype=torch.float64)
    params[3].grad.view(-1)[:5] = specials.to(dtype) if layout == "contiguous" else 0.0
    twin = clone_params(params)
    fusedclip.clip_grad_value_(params, clip_value, backend=cpu_backend)
    torch.nn.utils.clip_grad_value_(twin, clip_value, foreach=False)
    assert_bitwise_equal(grads(params), grads(twin))


def _torch_cuda_clamp(x: torch.Tensor, v: float) -> torch.Tensor:
    """torch's CUDA foreach clamp_min then clamp_max, emulated on the CPU: the bound in the
    compute type (fp32 for 16-bit dtypes), ``maximum(a, b) = a if isnan(a) or a > b else b`` and
    ``minimum`` likewise, so a tie takes the bound (with bound 0, every zero is +0.0)."""
    op = torch.float64 if x.dtype == torch.float64 else torch.float32
    a, lo, hi = x.to(op), torch.tensor(-v, dtype=op), torch.tensor(v, dtype=op)
    m = torch.where(a.isnan() | (a > lo), a, lo)
    return torch.where(m.isnan() | (m < hi), m, hi).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip_value", [0.0, 1.005, 0.5])
def test_clamp_cuda_rule_in_the_interpreter(dtype, clip_value):
    """The Triton kernel's CUDA variant (what runs on a GPU) against torch's CUDA rule."""
    from fusedclip import triton_backend

    if not triton_backend.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    tensors = random_tensors([70001, 5], dtype, seed=21)
    tensors[1].copy_(torch.tensor([math.inf, -math.nan, -0.0, 0.0, -1.0], dtype=torch.float64))
    expected = [_torch_cuda_clamp(t, clip_value) for t in tensors]
    triton_backend.clamp_pass(triton_backend.plan_for(tensors), clip_value, cuda_rule=True)
    assert_bitwise_equal(tensors, expected)


def test_clip_grad_value_many_mixed(cpu_backend):
    fp32 = make_params([(n % 23,) for n in range(150)], seed=3)
    bf16 = make_params([(n % 29,) for n in range(150)], torch.bfloat16, seed=4)
    params = [p for pair in zip(fp32, bf16) for p in pair]
    twin = clone_params(params)
    fusedclip.clip_grad_value_(params, 0.7, backend=cpu_backend)
    torch.nn.utils.clip_grad_value_(twin, 0.7, foreach=True)
    assert_bitwise_equal(grads(params), grads(twin))


def test_clamp_op_is_one_pass(cpu_backend):
    """The fused backends clamp with their own operator, not torch's two foreach passes."""
    if cpu_backend == "reference":
        pytest.skip("the fused backends' operator")
    tensors = random_tensors([10, 70000], torch.float32)
    impl = backends.select(cpu_backend, tensors)
    calls = []
    original = impl._OPS._clamp
    impl._OPS._clamp = lambda ts, v: (calls.append(len(ts)), original(ts, v))
    try:
        impl.clamp_(tensors, 0.1)
    finally:
        impl._OPS._clamp = original
    assert calls == [2]
    assert float(max(t.abs().max() for t in tensors)) == float(torch.tensor(0.1))


# ---- soft clipping -------------------------------------------------------------------------------

def _soft_coef(max_norm: float, norm: float) -> float:
    if math.isnan(norm):
        return math.nan
    if norm == 0 or math.isinf(max_norm):
        return 1.0
    return max_norm / (norm + max_norm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.0, 0.3, 1e3, math.inf])
def test_soft_clip_matches_oracle(cpu_backend, dtype, norm_type, max_norm):
    params = _params(dtype, seed=1)
    before = [g.double().clone() for g in grads(params)]
    norm = fusedclip.clip_grad_norm_(params, max_norm, norm_type, mode="soft",
                                     backend=cpu_backend)
    expected = oracle_norm(before, norm_type)
    torch.testing.assert_close(norm.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=rtol_for(dtype), atol=0)
    coef = _soft_coef(max_norm, expected)
    for g, b in zip(grads(params), before):
        torch.testing.assert_close(g, (b * coef).to(dtype), rtol=clip_rtol(dtype), atol=0)


def test_soft_coefficient_rules():
    from fusedclip import reference

    norms = torch.tensor([0.0, 1.0, math.inf, math.nan], dtype=torch.float64)
    for max_norm in (0.0, 2.0, math.inf):
        got = reference.clip_coef(max_norm, norms, soft=True)
        want = torch.tensor([_soft_coef(max_norm, float(n)) for n in norms], dtype=torch.float64)
        torch.testing.assert_close(got, want, equal_nan=True)


def test_bad_mode():
    params = _params(torch.float32)
    before = [g.clone() for g in grads(params)]
    with pytest.raises(ValueError, match="mode"):
        fusedclip.clip_grad_norm_(params, 1.0, mode="gentle")
    assert_bitwise_equal(grads(params), before)


# ---- per-tensor clipping -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
@pytest.mark.parametrize("thresholds", ["scalar", "list", "tensor"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_per_tensor_matches_oracle(cpu_backend, dtype, norm_type, thresholds, mode, layout):
    params = _params(dtype, layout, seed=2, scale=3.0)
    gs = grads(params)
    before = [g.double().clone() for g in gs]
    limits = [0.5 + i for i in range(len(gs))]
    arg = {"scalar": 2.0, "list": limits, "tensor": torch.tensor(limits)}[thresholds]
    per = fusedclip.clip_grad_norm_per_tensor_(params, arg, norm_type, mode=mode,
                                               backend=cpu_backend)
    assert per.shape == (len(gs),) and per.dtype == dtype
    for i, (g, b) in enumerate(zip(gs, before)):
        norm = oracle_norm([b], norm_type)
        torch.testing.assert_close(per[i].double(), torch.tensor(norm, dtype=torch.float64),
                                   rtol=rtol_for(dtype), atol=0)
        limit = 2.0 if thresholds == "scalar" else limits[i]
        coef = _soft_coef(limit, norm) if mode == "soft" else min(1.0, limit / (norm + 1e-6))
        torch.testing.assert_close(g, (b * coef).to(dtype), rtol=clip_rtol(dtype), atol=0)


def test_per_tensor_only_over_threshold_changes(cpu_backend):
    """A tensor under its threshold keeps its bits; one over it is scaled to the threshold."""
    params = _params(torch.float32, seed=4)
    gs = grads(params)
    norms = [float(g.norm()) for g in gs]
    limits = [n * 2 if i % 2 else n / 4 for i, n in enumerate(norms)]
    before = [g.clone() for g in gs]
    fusedclip.clip_grad_norm_per_tensor_(params, limits, backend=cpu_backend)
    for i, (g, b) in enumerate(zip(gs, before)):
        if i % 2 or norms[i] == 0:
            assert_bitwise_equal([g], [b])
        else:
            torch.testing.assert_close(float(g.double().norm()), limits[i], rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad, match", [
    ([1.0, 2.0], "thresholds, but there are"),
    ([1.0] * 5 + [-1.0], r"max_norm\[5\] must be a non-negative"),
    ([1.0, math.nan, 1.0, 1.0, 1.0, 1.0], r"max_norm\[1\]"),
    (-1.0, "non-negative"),
    (torch.ones(7), "thresholds, but there are"),
])
def test_per_tensor_bad_thresholds(bad, match):
    params = _params(torch.float32)
    before = [g.clone() for g in grads(params)]
    with pytest.raises(ValueError, match=match):
        fusedclip.clip_grad_norm_per_tensor_(params, bad)
    assert_bitwise_equal(grads(params), before)


def test_per_tensor_no_gradients():
    params = make_params([(3,)], none_every=1)
    assert fusedclip.clip_grad_norm_per_tensor_(params, 1.0).shape == (0,)


# ---- return_stats and StatsWindow --------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.1, 1e6])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_return_stats(cpu_backend, max_norm, per_tensor, dtype):
    params = _params(dtype, seed=5)
    twin = clone_params(params)
    before = [g.double().clone() for g in grads(params)]
    stats = fusedclip.clip_grad_norm_(params, max_norm, backend=cpu_backend,
                                      return_stats="per_tensor" if per_tensor else True)
    assert isinstance(stats, fusedclip.ClipStats)
    expected = fusedclip.clip_grad_norm_(twin, max_norm, backend="reference")
    assert stats.total_norm.dtype == expected.dtype
    torch.testing.assert_close(stats.total_norm, expected, rtol=1e-5, atol=0)
    norm = oracle_norm(before, 2.0)
    coef = min(1.0, max_norm / (norm + 1e-6))
    torch.testing.assert_close(float(stats.clip_coef), coef, rtol=1e-6, atol=0)
    assert bool(stats.clipped) == (coef < 1) and not bool(stats.nonfinite)
    if per_tensor:
        want = torch.tensor([oracle_norm([b], 2.0) for b in before], dtype=torch.float64)
        torch.testing.assert_close(stats.per_tensor_norms, want, rtol=1e-6, atol=0)
    else:
        assert stats.per_tensor_norms is None
    for g, t in zip(grads(params), grads(twin)):  # and it clipped, as without stats
        torch.testing.assert_close(g, t, rtol=clip_rtol(dtype), atol=0)


def test_return_stats_nonfinite(cpu_backend):
    params = _params(torch.float32, seed=6)
    params[0].grad[2] = math.inf
    stats = fusedclip.clip_grad_norm_(params, 1.0, backend=cpu_backend, return_stats=True)
    assert bool(stats.nonfinite) and bool(stats.clipped) and float(stats.clip_coef) == 0.0


def test_return_stats_bad_value():
    with pytest.raises(ValueError, match="return_stats"):
        fusedclip.clip_grad_norm_(_params(torch.float32), 1.0, return_stats="yes")


def test_stats_window_summary():
    window = fusedclip.StatsWindow(every=4, prefix="g/")
    norms = [1.0, 3.0, math.inf, 2.0]
    out = None
    for i, n in enumerate(norms):
        norm = torch.tensor(n, dtype=torch.float64)
        coef = torch.tensor(min(1.0, 2.0 / (n + 1e-6)), dtype=torch.float64)
        out = window.add(fusedclip.ClipStats.of(norm, coef, torch.float32))
        assert (out is None) == (i < 3)
    assert out["g/norm_mean"] == pytest.approx(2.0)
    assert out["g/norm_max"] == 3.0 and out["g/norm_min"] == 1.0 and out["g/norm_last"] == 2.0
    assert out["g/clipped_fraction"] == pytest.approx(0.75)  # 3.0, inf and 2.0 (the 1e-6)
    assert out["g/nonfinite_steps"] == 1.0 and out["g/steps"] == 4.0
    assert window.summary() == {}


# ---- AutoClipper ---------------------------------------------------------------------------------

def _norm_sequence():
    """Gradient scales with two spikes and an inf step."""
    scales = [1.0 + 0.05 * math.sin(i) for i in range(40)]
    scales[30], scales[35], scales[20] = 20.0, 50.0, math.inf
    return scales


def _host_zscore(norms, z_thresh, alpha, warmup):
    """ZClip's published rule (adaptive scaling) in plain Python floats: the threshold of every
    step (inf where it does not clip)."""
    out, buffer, mean, var = [], [], None, None
    for n in norms:
        if mean is None:
            if math.isfinite(n):
                buffer.append(n)
            if len(out) == warmup - 1:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            out.append(math.inf)
            continue
        std = math.sqrt(var)
        z = (n - mean) / (std + 1e-6)
        thr = mean + z_thresh * std / (z / z_thresh) if z > z_thresh else math.inf
        out.append(thr)
        if math.isfinite(n):
            x = min(n, thr)
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return out


def _host_percentile(norms, q, window, warmup):
    hist, out = [], []
    for i, n in enumerate(norms):
        hist.append(n if math.isfinite(n) else math.nan)
        hist = hist[-window:]
        finite = [h for h in hist if not math.isnan(h)]
        if i < warmup or not finite:
            out.append(math.inf)
        else:
            out.append(float(torch.quantile(torch.tensor(finite, dtype=torch.float64), q / 100)))
    return out


@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_auto_clipper_thresholds(cpu_backend, method):
    params = make_params([(50,), (7, 3)], seed=7)
    base = [p.grad.clone() for p in params]
    clipper = fusedclip.AutoClipper(params, method, warmup_steps=5, window=16,
                                    backend=cpu_backend)
    norms, thresholds = [], []
    for s in _norm_sequence():
        for p, b in zip(params, base):
            p.grad = b * s
        norms.append(oracle_norm(grads(params), 2.0))
        norm = float(clipper.step())
        assert norm == pytest.approx(norms[-1], rel=1e-6) or norm == norms[-1] == math.inf
        thresholds.append(float(clipper.threshold))
        after = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
        if math.isfinite(norms[-1]):
            assert after <= min(norms[-1], thresholds[-1]) * (1 + 1e-5)
            if thresholds[-1] == math.inf:
                assert after == pytest.approx(norms[-1], rel=1e-12)  # untouched
    want = (_host_zscore(norms, 2.5, 0.97, 5) if method == "zscore"
            else _host_percentile(norms, 10.0, 16, 5))
    torch.testing.assert_close(torch.tensor(thresholds, dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)
    assert thresholds[30] < norms[30] and thresholds[35] < norms[35]  # the spikes were clipped


@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_auto_clipper_state_dict(method):
    params = make_params([(30,)], seed=8)
    base = params[0].grad.clone()
    first = fusedclip.AutoClipper(params, method, warmup_steps=2, window=8)
    for s in _norm_sequence()[:10]:
        params[0].grad = base * s
        first.step()
    saved = first.state_dict()
    second = fusedclip.AutoClipper(params, method, warmup_steps=2, window=8)
    second.load_state_dict(saved)
    for s in _norm_sequence()[10:20]:
        params[0].grad = base * s
        a = first.step()
        ga = params[0].grad.clone()
        params[0].grad = base * s
        b = second.step()
        assert torch.equal(a, b) and torch.equal(ga, params[0].grad)
    with pytest.raises(ValueError, match="method"):
        fusedclip.AutoClipper(params, "zscore" if method != "zscore" else "percentile") \
            .load_state_dict(saved)
    kept = {k: v.clone() for k, v in saved["state"].items()}
    params[0].grad = base * 3.0
    first.step()  # a saved state_dict is a snapshot, not a view of the live history
    assert all(torch.equal(kept[k], v) for k, v in saved["state"].items())


@pytest.mark.parametrize("kwargs", [dict(method="median"), dict(alpha=1.0), dict(z_thresh=0),
                                    dict(percentile=120), dict(window=0), dict(warmup_steps=0),
                                    dict(clip_option="max")])
def test_auto_clipper_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        fusedclip.AutoClipper(make_params([(3,)]), **kwargs)


# ---- operators -----------------------------------------------------------------------------------

def test_opcheck_new_operators():
    if not fusedclip._extension.loaded():
        pytest.skip("fusedclip._C is not built")
    tensors = random_tensors([5, 0, 65537, 17], torch.bfloat16, seed=9)
    limits = torch.tensor([0.1, 1.0, 2.0, 0.5], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fusedclip.clip_per_tensor_, (tensors, limits, 2.0, False))
    torch.library.opcheck(torch.ops.fusedclip.clamp_, (tensors, 0.25))
    torch.library.opcheck(torch.ops.fusedclip.clip_, (tensors, 1.0, 2.0, False, None, None, True))


def test_opcheck_triton_operators():
    from fusedclip import triton_backend

    if not triton_backend.interpreting():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    tensors = random_tensors([5, 70000, 0, 17], torch.float32, seed=10)
    limits = torch.tensor([0.1, 1.0, 2.0, 0.5], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fusedclip.triton_clip_per_tensor_, (tensors, limits, 2.0, True))
    torch.library.opcheck(torch.ops.fusedclip.triton_clamp_, (tensors, 0.25))


# ---- GPU -----------------------------------------------------------------------------------------

def _gpu_backend(backend):
    if not fusedclip.available_backends()[backend].available:
        pytest.skip(f"backend {backend} unavailable")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_modes_cuda_match_reference(backend, dtype):
    _gpu_backend(backend)
    shapes = [(n * 37 % 4099,) for n in range(600)] + [(70001,), (1,), (33, 17)]
    params = make_params(shapes, dtype=dtype, device="cuda", seed=11)
    for run in ("value", "soft", "per_tensor", "stats", "agc"):
        mine, ref = clone_params(params), clone_params(params)
        if run == "agc":
            fusedclip.adaptive_clip_grad_(mine, backend=backend)
            fusedclip.adaptive_clip_grad_(ref, backend="reference")
            for g, e in zip(grads(mine), grads(ref)):
                torch.testing.assert_close(g, e, rtol=2 * clip_rtol(dtype), atol=0)
            continue
        if run == "value":
            for bound in (0.3, 0.0, 1.005):  # 0: torch's CUDA kernels give +0.0 everywhere
                mine, ref = clone_params(params), clone_params(params)
                fusedclip.clip_grad_value_(mine, bound, backend=backend)
                torch.nn.utils.clip_grad_value_(ref, bound)
                assert_bitwise_equal(grads(mine), grads(ref))
            continue
        if run == "soft":
            a = fusedclip.clip_grad_norm_(mine, 1.0, mode="soft", backend=backend)
            b = fusedclip.clip_grad_norm_(ref, 1.0, mode="soft", backend="reference")
        elif run == "per_tensor":
            a = fusedclip.clip_grad_norm_per_tensor_(mine, 0.5, backend=backend)
            b = fusedclip.clip_grad_norm_per_tensor_(ref, 0.5, backend="reference")
        else:
            a = fusedclip.clip_grad_norm_(mine, 1.0, return_stats="per_tensor",
                                          backend=backend).per_tensor_norms
            b = fusedclip.clip_grad_norm_(ref, 1.0, return_stats="per_tensor",
                                          backend="reference").per_tensor_norms
        torch.testing.assert_close(a, b, rtol=rtol_for(dtype), atol=0)
        for g, e in zip(grads(mine), grads(ref)):
            torch.testing.assert_close(g, e, rtol=2 * clip_rtol(dtype), atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_modes_never_sync_cuda(backend):
    """soft clipping, per-tensor clipping with a scalar threshold, stats and AutoClipper steps
    never wait for the device (after a first call has built the plans)."""
    _gpu_backend(backend)
    params = make_params([(4099,), (70001,), (3, 5)], device="cuda", seed=12)
    clippers = [fusedclip.AutoClipper(params, m, warmup_steps=1, backend=backend)
                for m in ("zscore", "percentile")]
    calls = [
        lambda: fusedclip.clip_grad_norm_(params, 1.0, mode="soft", backend=backend),
        lambda: fusedclip.clip_grad_norm_(params, 1.0, return_stats=True, backend=backend),
        lambda: fusedclip.clip_grad_norm_per_tensor_(params, 0.5, backend=backend),
        lambda: fusedclip.clip_grad_value_(params, 0.1, backend=backend),
        lambda: fusedclip.adaptive_clip_grad_(params, backend=backend),
        *[c.step for c in clippers],
    ]
    for strict in (False, True):
        for call in calls:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if strict else "default")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")


# ---- adaptive gradient clipping ------------------------------------------------------------------

def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm's ``adaptive_clip_grad`` semantics in plain torch ops (timm is not a dependency):
    unit norms in the parameters' own dtype, over all dims but the first (the whole tensor below
    two dims); a unit whose gradient norm is not below clip_factor * max(param unit norm, eps) is
    multiplied by that bound over max(gradient norm, 1e-6)."""
    for param in parameters:
        if param.grad is None:
            continue
        dims = tuple(range(1, param.dim())) if param.dim() > 1 else None
        keep = dims is not None
        limit = torch.linalg.vector_norm(param.detach(), norm_type, dim=dims, keepdim=keep)
        limit = limit.clamp(min=eps) * clip_factor
        grad = param.grad.detach()
        norm = torch.linalg.vector_norm(grad, norm_type, dim=dims, keepdim=keep)
        shrunk = grad * (limit / norm.clamp(min=1e-6))
        param.grad.copy_(torch.where(norm < limit, grad, shrunk))


AGC_SHAPES = [(16, 3, 3, 3), (17,), (1,), (0, 4), (40, 257), (3, 70001), (2, 1)]


def _agc_params(dtype, seed=0):
    """Parameters of unit scale with gradients whose units straddle their thresholds."""
    params = make_params(AGC_SHAPES, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in params:
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
        rows = p.shape[0] if p.dim() > 1 else 1
        spread = torch.logspace(-4, -1, max(rows, 1), dtype=torch.float64)
        p.grad = (p.grad.double() * spread.view(-1, *[1] * (p.dim() - 1))
                  if p.dim() > 1 else p.grad.double() * 0.02).to(dtype)
    return params


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_adaptive_clip_matches_oracle(cpu_backend, dtype, norm_type):
    params = _agc_params(dtype)
    twin = clone_params(params)
    for p, q in zip(params, twin):
        q.data = p.data.clone()
    fusedclip.adaptive_clip_grad_(params, 0.01, 1e-3, norm_type, backend=cpu_backend)
    fusedclip.adaptive_clip_grad_(twin, 0.01, 1e-3, norm_type, backend="reference")
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.grad, q.grad, rtol=2 * clip_rtol(dtype), atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adaptive_clip_matches_timm(cpu_backend, dtype):
    params = _agc_params(dtype, seed=3)
    twin = clone_params(params)
    before = [p.grad.clone() for p in params]
    for p, q in zip(params, twin):
        q.data = p.data.clone()
    fusedclip.adaptive_clip_grad_(params, backend=cpu_backend)
    timm_adaptive_clip_grad(twin)
    changed = kept = 0
    for p, q, b in zip(params, twin, before):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=0)
        if not b.numel():
            continue
        rows = (p.grad != b).reshape(p.shape[0] if p.dim() > 1 else 1, -1).any(1)
        changed += int(rows.sum())
        kept += int((~rows).sum())
    assert changed and kept  # some units over their threshold, some under


def test_adaptive_clip_bad_input(cpu_backend):
    with pytest.raises(ValueError, match="clip_factor"):
        fusedclip.adaptive_clip_grad_(make_params([(3,)]), clip_factor=-1.0)
    with pytest.raises(ValueError, match="eps"):
        fusedclip.adaptive_clip_grad_(make_params([(3,)]), eps=math.nan)
    if cpu_backend == "reference":
        return
    grads, params = random_tensors([12], torch.float32), [torch.randn(3, 4)]
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="shape"):  # the operators check what the API ensures
        backends.select(cpu_backend, grads).adaptive_clip_(grads, params, 0.01, 1e-3, 2.0)
    assert_bitwise_equal(grads, before)


def test_adaptive_clip_transposed_gradient(cpu_backend):
    """A gradient stored transposed: units are still its rows (dim 0), as timm's."""
    params = _agc_params(torch.float32, seed=5)[4:5]
    params[0].grad = params[0].grad.t().contiguous().t()
    twin = clone_params(params)
    twin[0].data = params[0].data.clone()
    fusedclip.adaptive_clip_grad_(params, backend=cpu_backend)
    timm_adaptive_clip_grad(twin)
    torch.testing.assert_close(params[0].grad, twin[0].grad, rtol=1e-5, atol=0)
