"""Clipping modes and monitoring: value clipping in one pass, soft and per-tensor clipping,
``return_stats`` and ``StatsWindow``, ``AutoClipper``, adaptive clipping.

Every backend runs them on every device of the conftest matrix (``backend`` x ``device``: CPU
tensors here, CUDA tensors too where a GPU is present), against torch where torch has the
operation and the independent fp64 oracle (tests/oracle.py) where it does not. The ``gpu`` tests
at the end check what only a GPU can show: that nothing waits for the device.
"""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
from gradients import DTYPES, clone_params, grads, make_params, random_tensors
from matrix import why_not
from oracle import (
    NORM_RTOL,
    assert_bitwise_equal,
    clip_rtol,
    oracle_adaptive_clipped,
    oracle_clipped,
    oracle_coef,
    oracle_norm,
    oracle_norm_dtype,
    ulp_close,
)

import fusedclip
from fusedclip import _select
from fusedclip.backends import triton as triton_backend
from fusedclip.backends._math import clip_coef
from fusedclip.backends.triton import plan as triton_plans

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

SHAPES = [(5,), (1,), (0,), (70001,), (33, 17), (4099,)]
# Tests without a backend that still depend on where the tensors are.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _params(dtype, device="cpu", layout="contiguous", seed=0, scale=1.0, shapes=SHAPES):
    params = make_params(shapes, dtype, device, seed, layout=layout)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    return params


# ---- value clipping ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("clip_value", [0.0, 1e-3, 0.5, 1.005, math.inf])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset"])
def test_clip_grad_value_bitwise_torch(backend, device, dtype, clip_value, layout):
    """Bitwise torch's own clamp on the device (its default path there: the twin's gradients are
    dense copies, so torch takes its foreach kernels on CUDA, whose zero signs differ from the
    CPU's)."""
    params = _params(dtype, device, layout)
    # inf, -inf, NaN and both zeros: clamped, clamped, kept, kept with their sign (on the CPU).
    specials = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0], dtype=torch.float64)
    params[3].grad.view(-1)[:5] = specials.to(dtype) if layout == "contiguous" else 0.0
    twin = clone_params(params)
    fusedclip.clip_grad_value_(params, clip_value, backend=backend)
    torch.nn.utils.clip_grad_value_(twin, clip_value)
    assert_bitwise_equal(grads(params), grads(twin))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_clip_value_beyond_the_dtype(backend, device, dtype):
    """A bound past the dtype's largest finite value rounds to inf and clamps nothing, on every
    backend (torch's clamp refuses to convert it; tests/api/test_parity.py). Small and large
    tensors take different loops in the C++ engine's CPU clamp."""
    bound = 1e5 if dtype == torch.float16 else 1e39
    params = make_params([(70001,), (33, 7)], dtype, device, seed=9)
    for p in params:
        p.grad.view(-1)[:3] = torch.tensor([math.inf, -math.inf, 6e4], dtype=dtype)
    before = [g.clone() for g in grads(params)]
    fusedclip.clip_grad_value_(params, bound, backend=backend)
    assert_bitwise_equal(grads(params), before)


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
    reason = why_not("triton", "cpu")
    if reason:
        pytest.skip(f"triton on cpu: {reason}")
    tensors = random_tensors([70001, 5], dtype, seed=21)
    tensors[1].copy_(torch.tensor([math.inf, -math.nan, -0.0, 0.0, -1.0], dtype=torch.float64))
    expected = [_torch_cuda_clamp(t, clip_value) for t in tensors]
    triton_backend.clamp_pass(triton_plans.plan_for(tensors), clip_value, cuda_rule=True)
    assert_bitwise_equal(tensors, expected)


def test_clip_grad_value_many_mixed(backend, device):
    fp32 = make_params([(n % 23,) for n in range(150)], device=device, seed=3)
    bf16 = make_params([(n % 29,) for n in range(150)], torch.bfloat16, device, seed=4)
    params = [p for pair in zip(fp32, bf16) for p in pair]
    twin = clone_params(params)
    fusedclip.clip_grad_value_(params, 0.7, backend=backend)
    torch.nn.utils.clip_grad_value_(twin, 0.7, foreach=True)
    assert_bitwise_equal(grads(params), grads(twin))


def test_clamp_op_is_one_pass(backend, device, monkeypatch):
    """The fused backends clamp in one pass, not torch's two foreach passes: ``cpp`` through its
    one-call path (the .grads read in C++), ``triton`` with its operator, one call for all the
    tensors of a device."""
    if backend == "reference":
        pytest.skip("the fused backends' operator")
    params = make_params([(10,), (70000,)], device=device)
    impl = _select.get(backend)
    calls = []
    original, original_params = impl.ops.clamp, impl._run_clamp

    def spy(tensors, clip_value):
        calls.append(len(tensors))
        return original(tensors, clip_value)

    def spy_params(params, clip_value, cuda_only):
        done = original_params(params, clip_value, cuda_only)
        calls.append("one call" if done else "general")
        return done

    monkeypatch.setattr(impl, "ops", dataclasses.replace(impl.ops, clamp=spy))
    monkeypatch.setattr(impl, "_run_clamp", spy_params)
    monkeypatch.setattr(torch, "_foreach_clamp_min_", None)  # torch's first pass: not taken
    fusedclip.clip_grad_value_(params, 0.1, backend=backend)
    assert calls == (["one call"] if backend == "cpp" else ["general", 2])
    assert float(max(g.abs().max() for g in grads(params))) == float(torch.tensor(0.1))


# ---- soft clipping -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.0, 0.3, 1e3, math.inf])
def test_soft_clip_matches_oracle(backend, device, dtype, norm_type, max_norm):
    params = _params(dtype, device, seed=1)
    before = [g.clone() for g in grads(params)]
    norm = fusedclip.clip_grad_norm_(params, max_norm, norm_type, mode="soft", backend=backend)
    expected = oracle_norm(before, norm_type)
    assert norm.dtype == oracle_norm_dtype(before) and norm.device == before[0].device
    torch.testing.assert_close(norm.double().cpu(), torch.tensor(expected, dtype=torch.float64),
                               rtol=NORM_RTOL, atol=0)
    for g, b in zip(grads(params), before):
        ulp_close(g, oracle_clipped(b, max_norm, expected, soft=True))


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_coefficient_rules(soft):
    """The shared coefficient (``backends._math.clip_coef``, what the features above the
    backends use) against the oracle's, zero, finite, infinite and NaN norms and limits."""
    norms = torch.tensor([0.0, 1.0, 1e-7, math.inf, math.nan], dtype=torch.float64)
    for max_norm in (0.0, 2.0, math.inf):
        got = clip_coef(max_norm, norms, soft=soft)
        want = torch.tensor([oracle_coef(max_norm, float(n), soft) for n in norms],
                            dtype=torch.float64)
        if not soft and max_norm == math.inf:
            # torch's inf / (inf + 1e-6) is NaN, clamp keeps it; the oracle's min(1, NaN) is 1.
            torch_coef = (torch.tensor(math.inf) / (torch.tensor(math.inf) + 1e-6)).clamp(max=1)
            assert torch_coef.isnan() and got[3].isnan()
            want[3] = math.nan
        torch.testing.assert_close(got, want, equal_nan=True)


def test_bad_mode():
    params = _params(torch.float32)
    before = [g.clone() for g in grads(params)]
    with pytest.raises(ValueError, match="mode"):
        fusedclip.clip_grad_norm_(params, 1.0, mode="gentle")
    assert_bitwise_equal(grads(params), before)


# ---- per-tensor clipping -------------------------------------------------------------------------

def _check_per_tensor(params, before, per, limits, norm_type, mode):
    """Per-tensor norms (the gradients' dtype promoted with float32, to 1e-5) and every gradient
    clipped by its own coefficient."""
    assert per.shape == (len(before),) and per.dtype == oracle_norm_dtype(before)
    assert per.device == before[0].device
    for i, (g, b) in enumerate(zip(grads(params), before)):
        norm = oracle_norm([b], norm_type)
        torch.testing.assert_close(per[i].double().cpu(), torch.tensor(norm, dtype=torch.float64),
                                   rtol=NORM_RTOL, atol=0)
        ulp_close(g, oracle_clipped(b, limits[i], norm, soft=mode == "soft"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_per_tensor_matches_oracle(backend, device, dtype, norm_type, mode, layout):
    """One threshold per tensor, each different (the formats a threshold can take are host-side:
    test_per_tensor_threshold_formats)."""
    params = _params(dtype, device, layout, seed=2, scale=3.0)
    before = [g.clone() for g in grads(params)]
    limits = [0.5 + i for i in range(len(before))]
    per = fusedclip.clip_grad_norm_per_tensor_(params, limits, norm_type, mode=mode,
                                               backend=backend)
    _check_per_tensor(params, before, per, limits, norm_type, mode)


@pytest.mark.parametrize("thresholds", ["scalar", "list", "tuple", "tensor", "tensor-f32"])
def test_per_tensor_threshold_formats(thresholds):
    """A number, a sequence or a 1-D tensor: all read on the host (``_args.as_thresholds``) before
    any backend runs, so one backend tests them."""
    params = _params(torch.float32, seed=2, scale=3.0)
    before = [g.clone() for g in grads(params)]
    limits = [0.5 + i for i in range(len(before))]
    arg = {"scalar": 2.0, "list": limits, "tuple": tuple(limits),
           "tensor": torch.tensor(limits, dtype=torch.float64),
           "tensor-f32": torch.tensor(limits)}[thresholds]
    per = fusedclip.clip_grad_norm_per_tensor_(params, arg, backend="reference")
    _check_per_tensor(params, before, per, [2.0] * len(before) if thresholds == "scalar"
                      else limits, 2.0, "hard")


def test_per_tensor_only_over_threshold_changes(backend, device):
    """A tensor under its threshold keeps its bits; one over it is scaled to the threshold."""
    params = _params(torch.float32, device, seed=4)
    gs = grads(params)
    norms = [oracle_norm([g], 2.0) for g in gs]
    limits = [n * 2 if i % 2 else n / 4 for i, n in enumerate(norms)]
    before = [g.clone() for g in gs]
    fusedclip.clip_grad_norm_per_tensor_(params, limits, backend=backend)
    for i, (g, b) in enumerate(zip(gs, before)):
        if i % 2 or norms[i] == 0:
            assert_bitwise_equal([g], [b])
        else:
            torch.testing.assert_close(oracle_norm([g], 2.0), limits[i], rtol=1e-5, atol=0)


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
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_return_stats(backend, device, max_norm, per_tensor, mode, dtype):
    """Every field against the oracle: the norm in torch's dtype, the fp64 coefficient (to 1e-6,
    whatever the dtype: a bf16 accumulation error cannot hide behind the rounded norm), the
    per-tensor norms, and every gradient clipped as without stats."""
    params = _params(dtype, device, seed=5)
    before = [g.clone() for g in grads(params)]
    stats = fusedclip.clip_grad_norm_(params, max_norm, mode=mode, backend=backend,
                                      return_stats="per_tensor" if per_tensor else True)
    assert isinstance(stats, fusedclip.ClipStats)
    norm = oracle_norm(before, 2.0)
    soft = mode == "soft"
    coef = oracle_coef(max_norm, norm, soft)
    where = before[0].device
    assert stats.total_norm.dtype == oracle_norm_dtype(before)
    assert stats.total_norm.device == where
    assert stats.clip_coef.dtype == torch.float64 and stats.clip_coef.device == where
    torch.testing.assert_close(stats.total_norm.double().cpu(),
                               torch.tensor(norm, dtype=torch.float64), rtol=1e-5, atol=0)
    # Tighter than the 1e-5 contract (NORM_RTOL): every backend accumulates in fp64.
    torch.testing.assert_close(float(stats.clip_coef), coef, rtol=1e-6, atol=0)
    assert bool(stats.clipped) == (coef < 1) and not bool(stats.nonfinite)
    if per_tensor:
        want = torch.tensor([oracle_norm([b], 2.0) for b in before], dtype=torch.float64)
        assert stats.per_tensor_norms.device == where
        torch.testing.assert_close(stats.per_tensor_norms.cpu(), want, rtol=1e-6, atol=0)
    else:
        assert stats.per_tensor_norms is None
    if coef == 1:
        assert_bitwise_equal(grads(params), before)
    for g, b in zip(grads(params), before):
        ulp_close(g, oracle_clipped(b, max_norm, norm, soft))


def test_return_stats_nonfinite(backend, device):
    params = _params(torch.float32, device, seed=6)
    params[0].grad[2] = math.inf
    stats = fusedclip.clip_grad_norm_(params, 1.0, backend=backend, return_stats=True)
    assert bool(stats.nonfinite) and bool(stats.clipped) and float(stats.clip_coef) == 0.0
    assert float(stats.total_norm) == math.inf


def test_return_stats_bad_value():
    with pytest.raises(ValueError, match="return_stats"):
        fusedclip.clip_grad_norm_(_params(torch.float32), 1.0, return_stats="yes")


@pytest.mark.parametrize("device", DEVICES)
def test_stats_window_summary(device):
    window = fusedclip.StatsWindow(every=4, prefix="g/")
    norms = [1.0, 3.0, math.inf, 2.0]
    out = None
    for i, n in enumerate(norms):
        norm = torch.tensor(n, dtype=torch.float64, device=device)
        coef = torch.tensor(min(1.0, 2.0 / (n + 1e-6)), dtype=torch.float64, device=device)
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
def test_auto_clipper_thresholds(backend, device, method):
    params = make_params([(50,), (7, 3)], device=device, seed=7)
    base = [p.grad.clone() for p in params]
    clipper = fusedclip.AutoClipper(params, method, warmup_steps=5, window=16, backend=backend)
    norms, thresholds = [], []
    for s in _norm_sequence():
        for p, b in zip(params, base):
            p.grad = b * s
        norms.append(oracle_norm(grads(params), 2.0))
        norm = clipper.step()
        assert norm.device == base[0].device and clipper.threshold.device == base[0].device
        norm = float(norm)
        assert norm == pytest.approx(norms[-1], rel=1e-6) or norm == norms[-1] == math.inf
        thresholds.append(float(clipper.threshold))
        after = oracle_norm(grads(params), 2.0)
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


def _through_torch_save(state_dict, map_location):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=map_location)


def _resumed_matches(method, backend, hops):
    """A clipper run for 10 steps, then checkpointed through torch.save/torch.load before every
    hop of ``hops`` after the first ((gradients' device, map_location) each: the devices its
    gradients are on after each reload) and run on for 5 steps, against a clipper on the first
    device that never stopped: same norms, thresholds and gradients (to fp64 / one fp32 rounding
    where the two run on different devices), and the history on the gradients' device from the
    first step after a reload."""
    def clipper_on(device):
        params = make_params([(50,), (7, 3)], device=device, seed=9)
        base = [p.grad.clone() for p in params]
        return params, base, fusedclip.AutoClipper(params, method, warmup_steps=3, window=8,
                                                   backend=backend)

    def step(params, base, clipper, s):
        for p, b in zip(params, base):
            p.grad = b * s
        return clipper.step(), [p.grad.clone() for p in params]

    scales = _norm_sequence()
    scales[12], scales[16], scales[17] = 20.0, math.inf, 30.0  # spikes after each reload
    straight = clipper_on(hops[0][0])
    moved = clipper_on(hops[0][0])
    for s in scales[:10]:
        step(*straight, s)
        step(*moved, s)
    same = True  # every step so far on the first device: bitwise the same history
    for n, (device, map_location) in enumerate(hops[1:]):
        saved = _through_torch_save(moved[2].state_dict(), map_location)
        assert all(v.device.type == map_location for v in saved["state"].values())
        moved = clipper_on(device)
        moved[2].load_state_dict(saved)
        same = same and device == hops[0][0]
        for s in scales[10 + 5 * n: 15 + 5 * n]:
            a, ga = step(*moved, s)
            b, gb = step(*straight, s)
            where = moved[1][0].device
            assert a.device == where and moved[2].threshold.device == where
            assert all(v.device == where for v in moved[2].state_dict()["state"].values())
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0 if same else clip_rtol(a.dtype),
                                       atol=0, equal_nan=True)
            torch.testing.assert_close(moved[2].threshold.cpu(), straight[2].threshold.cpu(),
                                       rtol=0 if same else 1e-12, atol=0)
            for x, y in zip(ga, gb):
                torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0 if same else clip_rtol(x.dtype),
                                           atol=0, equal_nan=True)


@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_auto_clipper_checkpoint_through_torch_save(backend, device, method):
    """Saved from ``device``, loaded with map_location="cpu" (as a checkpoint is read on a host
    without the device), then stepped with the gradients on ``device``."""
    _resumed_matches(method, backend, [(device, None), (device, "cpu")])


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["zscore", "percentile"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_auto_clipper_checkpoint_cuda_to_cpu_to_cuda(backend, method):
    """cuda -> (map_location="cpu") -> stepped on CPU gradients -> (map_location="cuda") ->
    stepped on CUDA gradients: the history follows the gradients both ways."""
    _runs_cuda(backend)
    _resumed_matches(method, backend, [("cuda", None), ("cpu", "cpu"), ("cuda", "cuda")])


@pytest.mark.parametrize("kwargs", [dict(method="median"), dict(alpha=1.0), dict(z_thresh=0),
                                    dict(percentile=120), dict(window=0), dict(warmup_steps=0),
                                    dict(clip_option="max")])
def test_auto_clipper_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        fusedclip.AutoClipper(make_params([(3,)]), **kwargs)


# ---- the mode operators --------------------------------------------------------------------------

def test_opcheck_mode_operators(engine_target):
    """``clip_per_tensor_``, ``clamp_``, ``adaptive_clip_`` and ``clip_`` with per-tensor norms:
    one schema for ``torch.ops.fusedclip.<op>`` and ``torch.ops.fusedclip.triton_<op>``
    (tests/engine/test_ops.py opchecks the others)."""
    name, device = engine_target
    prefix = "" if name == "cpp" else "triton_"

    def op(name):
        return getattr(torch.ops.fusedclip, prefix + name)

    tensors = random_tensors([5, 70000, 0, 17], torch.bfloat16, device, seed=9)
    limits = torch.tensor([0.1, 1.0, 2.0, 0.5], dtype=torch.float64, device=device)
    torch.library.opcheck(op("clip_per_tensor_"), ([t.clone() for t in tensors], limits, 2.0,
                                                   True))
    torch.library.opcheck(op("clamp_"), ([t.clone() for t in tensors], 0.25))
    torch.library.opcheck(op("clip_"), ([t.clone() for t in tensors], 1.0, 2.0, True, None, None,
                                        True))
    params = [torch.randn(t.shape, dtype=t.dtype, device=device) for t in tensors]
    torch.library.opcheck(op("adaptive_clip_"), ([t.clone() for t in tensors], params, 0.01,
                                                 1e-3, 2.0))


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


def _agc_params(dtype, device="cpu", seed=0, shapes=AGC_SHAPES):
    """Parameters of unit scale with gradients whose units straddle their thresholds."""
    params = make_params(shapes, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in params:
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        rows = p.shape[0] if p.dim() > 1 else 1
        spread = torch.logspace(-4, -1, max(rows, 1), dtype=torch.float64, device=device)
        p.grad = (p.grad.double() * spread.view(-1, *[1] * (p.dim() - 1))
                  if p.dim() > 1 else p.grad.double() * 0.02).to(dtype)
    return params


def _twin_with_data(params):
    twin = clone_params(params)
    for p, q in zip(params, twin):
        q.data = p.data.clone()
    return twin


def _changed_and_kept(params, before):
    """How many units of the gradients changed and how many kept every bit."""
    changed = kept = 0
    for p, b in zip(params, before):
        if not b.numel():
            continue
        rows = (bits_differ(p.grad, b)).reshape(p.shape[0] if p.dim() > 1 else 1, -1).any(1)
        changed += int(rows.sum())
        kept += int((~rows).sum())
    return changed, kept


def bits_differ(a, b):
    return (a != b) & ~(a.isnan() & b.isnan())


def _agc_oracle(g, p, clip_factor, eps, norm_type):
    """``oracle_adaptive_clipped``, which cannot take an empty tensor of two or more dims
    (``oracle_unit_norms`` reshapes it to (0, -1)): nothing there to clip."""
    if g.numel() == 0:
        return g.detach().cpu()
    return oracle_adaptive_clipped(g, p, clip_factor, eps, norm_type)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_adaptive_clip_matches_oracle(backend, device, dtype, norm_type):
    """timm's rule in fp64 (``oracle_adaptive_clipped``): a unit under its threshold keeps its
    bits, one over it is scaled to it with one rounding; fp16 and bf16 included."""
    params = _agc_params(dtype, device)
    before = [p.grad.clone() for p in params]
    fusedclip.adaptive_clip_grad_(params, 0.01, 1e-3, norm_type, backend=backend)
    for p, b in zip(params, before):
        ulp_close(p.grad, _agc_oracle(b, p, 0.01, 1e-3, norm_type))
    changed, kept = _changed_and_kept(params, before)
    assert changed and kept  # some units over their threshold, some under


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adaptive_clip_matches_timm(backend, device, dtype):
    params = _agc_params(dtype, device, seed=3)
    twin = _twin_with_data(params)
    before = [p.grad.clone() for p in params]
    fusedclip.adaptive_clip_grad_(params, backend=backend)
    timm_adaptive_clip_grad(twin)
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=0)
    changed, kept = _changed_and_kept(params, before)
    assert changed and kept  # some units over their threshold, some under


def test_adaptive_clip_bad_input(backend, device):
    with pytest.raises(ValueError, match="clip_factor"):
        fusedclip.adaptive_clip_grad_(make_params([(3,)], device=device), clip_factor=-1.0,
                                      backend=backend)
    with pytest.raises(ValueError, match="eps"):
        fusedclip.adaptive_clip_grad_(make_params([(3,)], device=device), eps=math.nan,
                                      backend=backend)
    if backend == "reference":
        return
    grads_, params = random_tensors([12], torch.float32, device), [torch.randn(3, 4).to(device)]
    before = [g.clone() for g in grads_]
    with pytest.raises(ValueError, match="shape"):  # the operators check what the API ensures
        _select.select(_select.parse(backend), grads_).adaptive_clip_(grads_, params, 0.01, 1e-3,
                                                                      2.0)
    assert_bitwise_equal(grads_, before)


def test_adaptive_clip_transposed_gradient(backend, device):
    """A gradient stored transposed: units are still its rows (dim 0), as timm's."""
    params = _agc_params(torch.float32, device, seed=5)[4:5]
    params[0].grad = params[0].grad.t().contiguous().t()
    assert not params[0].grad.is_contiguous()
    before = params[0].grad.clone()
    twin = _twin_with_data(params)
    fusedclip.adaptive_clip_grad_(params, backend=backend)
    timm_adaptive_clip_grad(twin)
    torch.testing.assert_close(params[0].grad, twin[0].grad, rtol=1e-5, atol=0)
    ulp_close(params[0].grad, oracle_adaptive_clipped(before, params[0], 0.01, 1e-3, 2.0))


# ---- many tensors --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_modes_on_many_tensors(backend, device, dtype):
    """600 tensors of odd sizes and a few large ones through every mode, against the oracle
    (torch for value clipping): launches over many table entries."""
    if (backend, device) == ("triton", "cpu"):
        pytest.skip("600 programs per pass take minutes in Triton's CPU interpreter")
    shapes = [(n * 37 % 4099,) for n in range(600)] + [(70001,), (1,), (33, 17)]
    params = make_params(shapes, dtype, device, seed=11)
    before = [g.clone() for g in grads(params)]
    norm = oracle_norm(before, 2.0)

    for bound in (0.3, 0.0, 1.005):
        mine, ref = clone_params(params), clone_params(params)
        fusedclip.clip_grad_value_(mine, bound, backend=backend)
        torch.nn.utils.clip_grad_value_(ref, bound)
        assert_bitwise_equal(grads(mine), grads(ref))

    mine = clone_params(params)
    got = fusedclip.clip_grad_norm_(mine, 1.0, mode="soft", backend=backend)
    torch.testing.assert_close(got.double().cpu(), torch.tensor(norm, dtype=torch.float64),
                               rtol=NORM_RTOL, atol=0)
    for g, b in zip(grads(mine), before):
        ulp_close(g, oracle_clipped(b, 1.0, norm, soft=True))

    mine = clone_params(params)
    per = fusedclip.clip_grad_norm_per_tensor_(mine, 0.5, backend=backend)
    _check_per_tensor(mine, before, per, [0.5] * len(before), 2.0, "hard")

    mine = clone_params(params)
    stats = fusedclip.clip_grad_norm_(mine, 1.0, return_stats="per_tensor", backend=backend)
    torch.testing.assert_close(float(stats.clip_coef), oracle_coef(1.0, norm), rtol=1e-6, atol=0)
    want = torch.tensor([oracle_norm([b], 2.0) for b in before], dtype=torch.float64)
    torch.testing.assert_close(stats.per_tensor_norms.cpu(), want, rtol=1e-6, atol=0)
    for g, b in zip(grads(mine), before):
        ulp_close(g, oracle_clipped(b, 1.0, norm))

    mine = _twin_with_data(params)
    fusedclip.adaptive_clip_grad_(mine, backend=backend)
    for p, b in zip(mine, before):
        ulp_close(p.grad, _agc_oracle(b, p, 0.01, 1e-3, 2.0))


# ---- GPU only: no host synchronization -----------------------------------------------------------

def _runs_cuda(backend):
    status = fusedclip.available_backends()[backend]
    if not status.runs_on("cuda"):
        pytest.skip(f"backend {backend} cannot run CUDA tensors here: {status.reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_modes_never_sync_cuda(backend):
    """soft clipping, per-tensor clipping with a scalar threshold, stats, value and adaptive
    clipping and AutoClipper steps never wait for the device (after a first call has built the
    plans)."""
    _runs_cuda(backend)
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


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_percentile_is_torchs_nanquantile_bit_for_bit(q):
    """AutoClipper's own nanquantile (traceable on every torch) against torch.nanquantile: 1-40
    values across magnitudes, with none, some and all of them NaN."""
    from fusedclip.auto import nanquantile

    gen = torch.Generator().manual_seed(11)
    for n in range(1, 41):
        x = torch.randn(n, dtype=torch.float64, generator=gen) * 10.0 ** (n % 7 - 3)
        x[torch.randperm(n, generator=gen)[: (n * 7) % (n + 1)]] = math.nan
        got, want = nanquantile(x, q), torch.nanquantile(x, q)
        assert torch.equal(got, want) or (got.isnan() and want.isnan()), (n, x, got, want)
