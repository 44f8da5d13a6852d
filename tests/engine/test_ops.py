"""The operator suite: the compiled backends' operators and plans against the fp64 oracle.

``cpp`` (``torch.ops.fusedclip.<op>``, fusedclip._C) and ``triton`` (``torch.ops.fusedclip.
triton_<op>``) implement the same schemas over the same table (csrc/ops.cpp), so one suite runs
both, on CPU tensors here (the C++ engine's CPU kernels; Triton in its interpreter) and on CUDA
tensors when a GPU is present (``engine_target`` in conftest). The public API on top of them is
tests/api/test_parity.py's business.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradients import DTYPES, NORM_TYPES, grads, make_params, random_tensors
from matrix import why_not
from oracle import (
    BITS_DTYPE,
    assert_bitwise_equal,
    assert_norm_close,
    oracle_clipped,
    oracle_coef,
    oracle_norm,
    oracle_scaled,
    ulp_close,
)

import fusedclip
from fusedclip import _select
from fusedclip.backends import _schema
from fusedclip.backends.cpp import _lib
from fusedclip.backends.triton import plan as triton_plans


class Engine:
    """One compiled backend as the suite drives it: its operators, its one-call path, its plans."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.backend = _select.get(name)
        prefix = "" if name == "cpp" else "triton_"
        for op in _schema.OPS:  # self.total_norm, self.clip, self.scale, ...
            setattr(self, op.rstrip("_"), getattr(torch.ops.fusedclip, prefix + op))

    def clip_params(self, params, max_norm, norm_type=2.0):
        """The one-call path clip_grad_norm_ takes, on any device (both engines walk the C++
        plan of fusedclip._C there)."""
        return self.backend.clip_params(params, max_norm, norm_type, cuda_only=False)

    def ops_plans_built(self) -> int:
        """Plans built by the cache the operators use (Triton's own, in Python)."""
        return _lib.module().plans_built() if self.name == "cpp" else triton_plans.plans_built()

    def clear_ops_plans(self) -> None:
        if self.name == "cpp":
            _lib.module().clear_plan_cache()
        else:
            triton_plans.clear_cache()


@pytest.fixture
def engine(engine_target) -> Engine:
    return Engine(engine_target[0])


@pytest.fixture
def dev(engine_target) -> str:
    return engine_target[1]


def coef(value: float, device="cpu") -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, device=device)


# Around the tile (4096), chunk (65536) and 16-byte boundaries, empty tensors in between.
SIZES = [0, 1, 7, 8, 9, 0, 4095, 4096, 4097, 65535, 65537, 0, 2 * 65536 + 3]


def tensors_for(dtype, device, seed=0, sizes=SIZES, scale=1.0):
    """Random tensors of ``sizes``, every third one a view one element into its storage (so the
    plan has an unaligned group as well as an aligned one)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        extra = 1 if i % 3 == 2 else 0
        t = (torch.randn(n + extra, generator=gen, dtype=torch.float64) * scale).to(dtype)
        out.append(t.to(device)[extra:])
    return out


def with_odd_nan(t: torch.Tensor) -> torch.Tensor:
    """``t`` with one NaN of a non-canonical payload. A GPU that multiplies it writes its canonical
    NaN instead, so on CUDA unchanged bits prove nothing was written (x86 keeps payloads, so on the
    CPU they only prove nothing changed)."""
    odd = {torch.float32: 0x7FC01234, torch.float64: 0x7FF8000000001234,
           torch.float16: 0x7E12, torch.bfloat16: 0x7FD2}[t.dtype]
    as_ints = t.view(BITS_DTYPE[t.element_size()])
    as_ints[tuple(s // 2 for s in t.shape)] = odd
    assert t.isnan().sum() == 1
    return t


# ---- pass 1 and pass 2 against the oracle --------------------------------------------------------

@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_matches_oracle(engine, dev, dtype, norm_type):
    tensors = tensors_for(dtype, dev, seed=1)
    before = [t.clone() for t in tensors]
    expected = oracle_norm(before, norm_type)
    norm, per = engine.clip(tensors, 0.3 * expected, norm_type, False)
    assert norm.dtype == torch.float64 and norm.device.type == dev and per.numel() == 0
    assert_norm_close(norm, expected)
    for t, t0 in zip(tensors, before):
        ulp_close(t, oracle_clipped(t0.cpu(), 0.3 * expected, expected))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_call_path_matches_oracle(engine, dev, dtype, norm_type, layout):
    """``clip_params``: the .grads read in C++, the norm returned in torch's dtype."""
    shapes = [(64, 33), (7, 3, 5), (1, 1), (0, 4), (300, 229), (3, 4099)]
    params = make_params(shapes, dtype, dev, seed=1, layout=layout)
    before = [g.clone() for g in grads(params)]
    expected = oracle_norm(before, norm_type)
    max_norm = 0.3 * expected
    norm = engine.clip_params(params, max_norm, norm_type)
    assert norm is not None and norm.device.type == dev
    assert norm.dtype == torch.promote_types(dtype, torch.float32)
    assert_norm_close(norm, expected)  # 1e-5, whatever the gradients' dtype
    for g, g0 in zip(grads(params), before):
        ulp_close(g, oracle_clipped(g0.cpu(), max_norm, expected))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_per_tensor_norms_and_coefficient(engine, dev, norm_type):
    # Every dtype at once: tensor i of SIZES in DTYPES[i % 4], each one reduced on its own.
    tensors = [t.to(DTYPES[i % 4]) for i, t in enumerate(tensors_for(torch.float64, dev, seed=2))]
    norm, c, per = engine.total_norm(tensors, norm_type, 0.5, True)
    expected = oracle_norm(tensors, norm_type)
    assert_norm_close(norm, expected)
    assert c.dtype == torch.float64 and c.device.type == dev
    torch.testing.assert_close(float(c), oracle_coef(0.5, expected), rtol=1e-12, atol=0)
    assert per.shape == (len(tensors),)
    for t, n in zip(tensors, per.tolist()):
        torch.testing.assert_close(n, oracle_norm([t], norm_type), rtol=1e-12, atol=0)
    # Asking for no per-tensor norms changes nothing else.
    norm2, coef2, per2 = engine.total_norm(tensors, norm_type, 0.5, False)
    assert per2.numel() == 0
    assert_bitwise_equal([norm2, coef2], [norm, c])


def _poisoned_rows(count, device):
    return torch.full((count, 2), math.nan, dtype=torch.float64, device=device)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_partials_then_finish_are_pass_1(engine, dev, norm_type):
    """partials_ writes every tensor's own (m, s) (every row, poisoned first); finishing the rows
    gives the oracle's norm, and each row alone the tensor's own norm, as total_norm's per-tensor
    output; a tensor at a time (BackwardClipper's rows) or all in one call, the same rows."""
    tensors = [t.to(DTYPES[i % 4]) for i, t in enumerate(tensors_for(torch.float64, dev, seed=4))]
    rows = _poisoned_rows(len(tensors), dev)
    engine.partials(tensors, norm_type, rows)
    one_by_one = _poisoned_rows(len(tensors), dev)
    for i, t in enumerate(tensors):
        engine.partials([t], norm_type, one_by_one[i:i + 1])
    assert_bitwise_equal([one_by_one], [rows])
    assert not rows.isnan().any()
    for t, row in zip(tensors, rows):
        if t.numel() == 0:
            assert row.tolist() == [0.0, 0.0]
    norm, c = engine.finish_partials(rows, norm_type, 0.5)
    expected = oracle_norm(tensors, norm_type)
    assert_norm_close(norm, expected)
    torch.testing.assert_close(float(c), oracle_coef(0.5, expected), rtol=1e-12, atol=0)
    per = engine.total_norm(tensors, norm_type, 0.5, True)[2]
    for i in range(len(tensors)):
        own = engine.finish_partials(rows[i:i + 1].clone(), norm_type, 0.5)[0]
        torch.testing.assert_close(float(own), float(per[i]), rtol=1e-15, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
def test_finish_partials_unscales_and_flags(engine, dev, norm_type):
    """The AMP arguments of the finish: the norm of x * inv_scale, the coefficient that unscales
    too, and found_inf set by an inf or NaN element (an m that is not finite), left alone
    otherwise."""
    tensors = tensors_for(torch.float32, dev, seed=5, sizes=[300, 70000, 5])
    rows = _poisoned_rows(3, dev)
    engine.partials(tensors, norm_type, rows)
    inv = torch.tensor(2.0**-10, device=dev)
    found = torch.zeros((), device=dev)
    norm, c = engine.finish_partials(rows, norm_type, 0.5, inv, found)
    expected = oracle_norm(tensors, norm_type) * 2.0**-10
    assert_norm_close(norm, expected)
    torch.testing.assert_close(float(c), oracle_coef(0.5, expected) * 2.0**-10, rtol=1e-12,
                               atol=0)
    assert float(found) == 0.0
    tensors[1][123] = math.inf
    engine.partials(tensors, norm_type, rows)
    engine.finish_partials(rows, norm_type, 0.5, inv, found)
    assert float(found) == 1.0
    nothing = torch.zeros((0, 2), dtype=torch.float64, device=dev)
    assert float(engine.finish_partials(nothing, norm_type, 0.5)[0]) == 0.0


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 1.5, 8.0])
@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 3e38])
def test_extreme_magnitudes_neither_overflow_nor_underflow(engine, dev, norm_type, magnitude):
    # fp32 values whose powers leave fp32 range (and, for p = 8, fp64 range).
    tensors = random_tensors([100, 65537, 3], torch.float32, dev, seed=3, scale=magnitude / 4)
    tensors = [t.clamp(-3e38, 3e38) for t in tensors]
    norm, _, _ = engine.total_norm(tensors, norm_type, math.inf, False)
    assert_norm_close(norm, oracle_norm(tensors, norm_type))


@pytest.mark.parametrize("norm_type", [2.0, 3.0])
def test_fp64_gradients_past_fp64_square_range(engine, dev, norm_type):
    tensors = random_tensors([1000, 77], torch.float64, dev, seed=4, scale=1e200)
    norm, _, _ = engine.total_norm(tensors, norm_type, math.inf, False)
    assert math.isfinite(float(norm))
    assert_norm_close(norm, oracle_norm(tensors, norm_type))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("bad", ["nan", "inf", "both"])
def test_nonfinite_norm(engine, dev, norm_type, bad):
    tensors = random_tensors([70000, 5, 300], torch.bfloat16, dev, seed=5)
    if bad in ("inf", "both"):
        tensors[0][66000] = -math.inf
    if bad in ("nan", "both"):
        tensors[2][17] = math.nan
    norm, c, per = engine.total_norm(tensors, norm_type, 1.0, True)
    expected = math.inf if bad == "inf" else math.nan
    assert_norm_close(norm, expected)
    assert_norm_close(c, 0.0 if bad == "inf" else math.nan)
    assert_norm_close(per[1], oracle_norm([tensors[1]], norm_type))


def test_mixed_dtypes_share_one_reduction(engine, dev):
    sizes = [(n * 7919) % 3001 for n in range(40)] + [70001, 0, 3]
    tensors = []
    for i, dtype in enumerate(DTYPES):
        tensors += tensors_for(dtype, dev, seed=6 + i, sizes=sizes[i::4])
    for norm_type in NORM_TYPES:
        norm, _, per = engine.total_norm(tensors, norm_type, math.inf, True)
        assert_norm_close(norm, oracle_norm(tensors, norm_type))
        for t, n in zip(tensors, per.tolist()):
            torch.testing.assert_close(n, oracle_norm([t], norm_type), rtol=1e-12, atol=0)
    before = [t.clone() for t in tensors]
    expected = oracle_norm(before, 2.0)
    norm, _ = engine.clip(tensors, 1.0, 2.0, False)
    assert_norm_close(norm, expected)
    for t, t0 in zip(tensors, before):
        ulp_close(t, oracle_clipped(t0.cpu(), 1.0, expected))


def test_all_empty_tensors(engine, dev):
    tensors = [torch.empty(0, device=dev), torch.empty(3, 0, device=dev)]
    norm, c, per = engine.total_norm(tensors, 2.0, 1.0, True)
    assert float(norm) == 0.0 and float(c) == 1.0 and per.tolist() == [0.0, 0.0]
    engine.clip(tensors, 1.0, 2.0, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.6180339887, 0.0, 1.0 - 2**-40, math.nan])
def test_scale_writes_every_element_once_rounded(engine, dev, dtype, value):
    # Distinct nonzero values everywhere, so an element the rescale skipped cannot pass.
    gen = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(dev)

    per_16_bytes = 16 // torch.tensor([], dtype=dtype).element_size()
    tensors = tensors_for(dtype, dev, seed=7)
    tensors += [rand(300, 7).t(), rand(70001 + per_16_bytes)[per_16_bytes:]]  # permuted; offset
    tensors += [rand(n % 97) for n in range(0, 300, 7)]  # but 16-byte aligned; many small ones
    tensors = [t.abs().add_(0.5) for t in tensors]
    expected = [oracle_scaled(t.cpu(), value) for t in tensors]
    engine.scale(tensors, coef(value, dev))
    assert_bitwise_equal([t.cpu() for t in tensors], expected)


def test_scale_by_one_changes_nothing(engine, dev):
    tensors = [with_odd_nan(t) for t in random_tensors([10, 70001, 3], torch.bfloat16, dev,
                                                       seed=2)]
    before = [t.clone() for t in tensors]
    engine.scale(tensors, coef(1.0, dev))
    assert_bitwise_equal(tensors, before, nan_payloads=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_over_runs(engine, dev, dtype):
    sizes = [(n * 7919 % 200003,) for n in range(40)] if dev == "cuda" or engine.name == "cpp" \
        else [(n * 389 % 70001,) for n in range(12)]  # (Triton's interpreter: fewer chunks)
    params = make_params(sizes, dtype, dev, seed=8)
    pristine = [g.clone() for g in grads(params)]
    results = []
    for _ in range(5):
        for g, g0 in zip(grads(params), pristine):
            g.copy_(g0)
        norm = engine.clip_params(params, 1.0, 2.0)
        results.append([norm] + [g.clone() for g in grads(params)])
    for r in results[1:]:
        assert_bitwise_equal(r, results[0])


@pytest.mark.parametrize("norm_type, max_norm", [(2.0, 5e-324), (5e-324, 1.0), (1.0, 1.0)])
def test_scalars_that_are_integers_one_in_bits(engine, dev, norm_type, max_norm):
    # 5e-324 is the fp64 whose bits are the integer 1, which Triton would compile as a constant.
    tensors = tensors_for(torch.float32, dev, seed=13, sizes=[300, 7])
    norm, c, _ = engine.total_norm(tensors, norm_type, max_norm, False)
    assert_norm_close(norm, oracle_norm(tensors, norm_type))
    torch.testing.assert_close(float(c), min(1.0, max_norm / (float(norm) + 1e-6)), rtol=1e-12,
                               atol=0)


# ---- the plan caches -----------------------------------------------------------------------------

def test_plan_is_reused_while_grads_are_unchanged(engine, dev):
    params = make_params([(64, 32), (32,), (7, 3, 5), (1000,)], torch.float32, dev, seed=9)
    engine.clip_params(params, 1e9)
    engine.clip(grads(params), 1e9, 2.0, False)
    built = _lib.module().plans_built(), engine.ops_plans_built()
    for _ in range(3):
        engine.clip_params(params, 1e9)
        engine.clip(grads(params), 1e9, 2.0, False)
        engine.total_norm(grads(params), 2.0, math.inf, False)
    assert (_lib.module().plans_built(), engine.ops_plans_built()) == built


def test_new_grad_at_the_same_address_reuses_the_plan(engine, dev):
    """The table holds addresses and sizes only: a new gradient tensor over the same memory (as
    the caching allocator hands back after zero_grad(set_to_none=True)) needs no new plan."""
    storage = torch.randn(5000, device=dev)
    params = make_params([(3000,), (2000,)], torch.float32, dev, seed=19)
    params[0].grad, params[1].grad = storage[:3000].view(3000), storage[3000:].view(2000)
    engine.clip_params(params, 1e9)
    built = _lib.module().plans_built()
    fresh = torch.randn(5000, device=dev)
    storage.copy_(fresh)
    params[0].grad, params[1].grad = storage[:3000].view(3000), storage[3000:].view(2000)
    expected = oracle_norm([fresh], 2.0)
    norm = engine.clip_params(params, 0.5)
    assert _lib.module().plans_built() == built
    assert_norm_close(norm, expected, torch.float32)
    ulp_close(storage, oracle_clipped(fresh.cpu(), 0.5, expected))


def test_reallocated_empty_grads_keep_the_plan(engine, dev):
    params = make_params([(5,), (0,), (3, 0)], torch.float32, dev, seed=18)
    engine.clip_params(params, 1.0)
    built = _lib.module().plans_built()
    params[1].grad = torch.empty(0, device=dev)  # another (empty) tensor: nothing to read
    engine.clip_params(params, 1.0)
    assert _lib.module().plans_built() == built


def reallocate(params):
    params[1].grad = params[1].grad.clone()


def new_storage_in_place(params):
    # The same tensor object, given another storage.
    params[1].grad.set_(torch.randn(3, 5, device=params[1].device))


def resize(params):
    params[1] = torch.nn.Parameter(torch.zeros(7, device=params[1].device))
    params[1].grad = torch.randn(7, device=params[1].device)


def set_none(params):
    params[1].grad = None


def swap_two(params):
    params[2].grad, params[3].grad = params[3].grad, params[2].grad


def change_dtype(params):
    params[2] = torch.nn.Parameter(params[2].detach().double())
    params[2].grad = torch.randn(257, dtype=torch.float64, device=params[2].device)


@pytest.mark.parametrize(
    "change", [reallocate, new_storage_in_place, resize, set_none, swap_two, change_dtype]
)
def test_plan_is_rebuilt_when_a_grad_changes(engine, dev, change):
    shapes = [(70000,), (3, 5), (257,), (257,)]
    params = make_params(shapes, torch.float32, dev, seed=10)
    # Freed memory gets reused: a plan cached by an earlier test could match the changed keys
    # (correctly: same addresses, sizes, dtypes), which would hide the build this test counts.
    _lib.module().clear_plan_cache()
    engine.clip_params(params, 1e9)
    built = _lib.module().plans_built()
    change(params)
    before = [g.clone() for g in grads(params)]
    expected = oracle_norm(before, 2.0)
    norm = engine.clip_params(params, 0.1)
    assert _lib.module().plans_built() == built + 1
    assert_norm_close(norm, expected, norm.dtype)
    for g, g0 in zip(grads(params), before):
        ulp_close(g, oracle_clipped(g0.cpu(), 0.1, expected))


def test_plan_cache_evicts_the_least_recently_used(engine, dev):
    """Eight plans are kept (csrc/engine/plan.cpp kCacheSize, triton/plan.py CACHE_SIZE); a ninth
    evicts the least recently used one, and every call stays correct."""
    lists = [random_tensors([100 + i, 7], torch.float32, dev, seed=20 + i) for i in range(9)]
    engine.clear_ops_plans()
    start = engine.ops_plans_built()

    def run(i):
        before = [t.clone() for t in lists[i]]
        expected = oracle_norm(before, 2.0)
        norm, _ = engine.clip(lists[i], 0.5, 2.0, False)
        assert_norm_close(norm, expected)
        for t, t0 in zip(lists[i], before):
            ulp_close(t, oracle_clipped(t0.cpu(), 0.5, expected))

    for i in range(8):
        run(i)
    assert engine.ops_plans_built() == start + 8
    for i in range(8):
        run(i)  # all cached
    assert engine.ops_plans_built() == start + 8
    run(8)  # evicts list 0, the least recently used
    for i in range(1, 9):
        run(i)
    assert engine.ops_plans_built() == start + 9
    run(0)
    assert engine.ops_plans_built() == start + 10


def test_triton_plan_table_is_the_cpp_one(dev):
    """The Python plan (Triton's operators) and the C++ plan (fusedclip._C, which
    clip_grad_norm_(backend="triton") walks) lay out identical tables and groups."""
    reason = why_not("cpp", dev)
    if reason:
        pytest.skip(f"cpp on {dev}: {reason}")
    params = make_params([(70000,), (5, 3), (0,), (4099,), (300, 7)], torch.float16, dev, seed=12,
                         layout="offset")
    params += make_params([(65537,), (9,)], torch.bfloat16, dev, seed=13)
    params += make_params([(3, 3)], torch.float64, dev, seed=14)
    table, num_tensors, num_chunks, result_dtype, groups = _lib.module().plan_of_params(
        params, False, False, True)
    python = triton_plans.build([triton_plans._key(g) for g in grads(params)], table.device)
    assert torch.equal(python.table.cpu(), table.cpu())
    assert (python.num_tensors, python.num_chunks, python.result_dtype) == (
        num_tensors, num_chunks, result_dtype)
    assert python.groups == tuple(triton_plans.Group(*g) for g in groups)
    assert len({g.aligned for g in python.groups}) == 2  # both alignments are exercised


def test_triton_norm_out_in_the_requested_dtype(dev):
    """Triton's pass 1 writes the norm rounded to the dtype clip_grad_norm_ returns (the C++
    engine's is read through clip_params, test_one_call_path_matches_oracle)."""
    from fusedclip.backends import triton

    reason = why_not("triton", dev)
    if reason:
        pytest.skip(f"triton on {dev}: {reason}")
    tensors = tensors_for(torch.float32, dev, seed=2)
    r = triton.norm_pass(triton_plans.plan_for(tensors),
                         triton.Request(2.0, 0.5, per_tensor=True, out_dtype=torch.bfloat16))
    expected = oracle_norm(tensors, 2.0)
    assert_norm_close(r.norm, expected)
    assert r.out.dtype == torch.bfloat16
    assert float(r.out) == float(torch.tensor(expected).to(torch.bfloat16))


def test_chunk_size_matches_the_cpp_plan():
    if not _lib.loaded():
        pytest.skip(f"fusedclip._C is not built ({_lib.LOAD_ERROR})")
    assert _lib.module().CHUNK_ELEMS == triton_plans.CHUNK


def test_writes_bump_version_counters(engine, dev):
    params = make_params([(64, 32), (32,), (7, 3, 5), (1000,)], torch.float32, dev, seed=11)
    versions = [g._version for g in grads(params)]
    engine.clip_params(params, 0.1)
    assert all(g._version > v for g, v in zip(grads(params), versions))
    versions = [g._version for g in grads(params)]
    engine.clip(grads(params), 0.1, 2.0, False)
    assert all(g._version > v for g, v in zip(grads(params), versions))


# ---- what the one-call path hands to the general path, and what the operators refuse ------------

def test_one_call_path_declines_what_it_cannot_take(engine, dev):
    dense = make_params([(4, 3)], device=dev, seed=12)
    gapped = make_params([(4, 3)], device=dev, seed=12, layout="strided")
    sparse = torch.nn.Parameter(torch.zeros(4, device=dev))
    sparse.grad = torch.ones(4, device=dev).to_sparse()
    complex_ = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64, device=dev))
    complex_.grad = torch.ones(4, dtype=torch.complex64, device=dev)
    no_grad = torch.nn.Parameter(torch.zeros(2, device=dev))
    assert engine.clip_params(dense, 1.0) is not None
    for params in (gapped, [sparse], [complex_], [no_grad], [], dense + ["not a tensor"]):
        assert engine.clip_params(params, 1.0) is None
    assert engine.clip_params(tuple(dense), 1.0) is None  # lists only
    if dev == "cpu":
        assert engine.backend.clip_params(dense, 1.0, 2.0, cuda_only=True) is None


def test_gradients_sharing_memory_are_refused_untouched(engine, dev):
    p = torch.nn.Parameter(torch.zeros(10, device=dev))
    p.grad = torch.randn(10, device=dev)
    storage = torch.randn(20, device=dev)
    a = torch.nn.Parameter(torch.zeros(8, device=dev))
    b = torch.nn.Parameter(torch.zeros(8, device=dev))
    a.grad, b.grad = storage[:8], storage[4:12]
    for params in ([p, p], [a, b]):
        before = [g.clone() for g in grads(params)]
        with pytest.raises(ValueError, match="share memory"):
            engine.clip_params(params, 1e-3)
        with pytest.raises(ValueError, match="share memory"):
            engine.clip(grads(params), 1e-3, 2.0, False)
        with pytest.raises(ValueError, match="share memory"):
            fusedclip.clip_grad_norm_(params, 1e-3, backend=engine.name)
        assert_bitwise_equal(grads(params), before)


BAD_CALLS = [
    (lambda e, t: e.total_norm(t, 0.0, 1.0, False), "norm_type must be > 0"),
    (lambda e, t: e.total_norm(t, math.nan, 1.0, False), "norm_type must be > 0"),
    (lambda e, t: e.clip(t, -1.0, 2.0, False), "max_norm must be >= 0"),
    (lambda e, t: e.clip(t, math.nan, 2.0, False), "max_norm must be >= 0"),
    (lambda e, t: e.clip([*t, torch.ones(3, dtype=torch.int64, device=t[0].device)], 1.0, 2.0,
                         False), r"tensors\[2\] has dtype (Long|torch\.int64)"),
    (lambda e, t: e.clip([*t, torch.ones(4, 4, device=t[0].device)[:, ::2]], 1.0, 2.0, False),
     r"tensors\[2\] is a view with gaps"),
    (lambda e, t: e.scale([*t, torch.ones(1, 3, device=t[0].device).expand(2, 3)],
                          coef(0.5, t[0].device)), r"tensors\[2\] is a view"),
    (lambda e, t: e.scale([*t, torch.ones(2, device=t[0].device).to_sparse()],
                          coef(0.5, t[0].device)), "Sparse|layout"),
    (lambda e, t: e.scale(t, torch.tensor(0.5, device=t[0].device)), "coef must be float64"),
    (lambda e, t: e.scale(t, torch.ones(2, dtype=torch.float64, device=t[0].device)),
     "coef must have one element"),
    (lambda e, t: e.clip(t, 1.0, 2.0, False, torch.ones(2, device=t[0].device)),
     "inv_scale must have one element"),
    (lambda e, t: e.clip(t, 1.0, 2.0, False, None, torch.zeros((), dtype=torch.float64,
                                                                device=t[0].device)),
     "found_inf must be float32"),
    (lambda e, t: e.clip([], 1.0, 2.0, False), "no tensor arguments|at least one tensor"),
    (lambda e, t: e.partials(t, 2.0, torch.zeros(2, 2, dtype=torch.float32, device=t[0].device)),
     r"out must be a contiguous float64 tensor of shape \[2, 2\]"),
    (lambda e, t: e.partials(t, 2.0, torch.zeros(3, 2, dtype=torch.float64, device=t[0].device)),
     r"out must be a contiguous float64 tensor of shape \[2, 2\]"),
    (lambda e, t: e.partials(t, 0.0, torch.zeros(2, 2, dtype=torch.float64, device=t[0].device)),
     "norm_type must be > 0"),
    (lambda e, t: e.finish_partials(torch.zeros(2, 3, dtype=torch.float64, device=t[0].device),
                                    2.0, 1.0), r"partials must be a contiguous float64 tensor"),
    (lambda e, t: e.finish_partials(torch.zeros(2, 2, dtype=torch.float64, device=t[0].device),
                                    2.0, -1.0), "max_norm must be >= 0"),
]


@pytest.mark.parametrize("call, match", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_operators_reject_bad_arguments_untouched(engine, dev, call, match):
    tensors = random_tensors([5, 70000], torch.float32, dev, seed=13)
    before = [t.clone() for t in tensors]
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(engine, tensors)
    assert_bitwise_equal(tensors, before)


@pytest.mark.gpu
def test_operators_reject_tensors_on_another_device(engine):
    with pytest.raises(RuntimeError, match=r"coef is on cuda:0 but tensors\[0\] is on cpu"):
        engine.scale([torch.ones(3)], coef(0.5, "cuda"))
    first = torch.ones(5, device="cuda")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is a view with gaps"):
        engine.scale([first, torch.ones(4, 4, device="cuda")[:, ::2]], coef(0.5, "cuda"))
    assert torch.equal(first, torch.ones(5, device="cuda"))


# ---- torch.compile and opcheck -------------------------------------------------------------------

def test_opcheck(engine, dev):
    # The C++ op's dtype dispatch for every dtype; the schema and the fake (what opcheck checks
    # besides) do not depend on it, which keeps Triton's interpreter to one.
    for dtype in DTYPES if engine.name == "cpp" else [torch.float32]:
        tensors = random_tensors([5, 0, 17], dtype, dev) + [torch.randn(4, 6).to(dtype).to(dev).t()]
        torch.library.opcheck(engine.scale, (tensors, coef(0.37, dev)))
    tensors = tensors_for(torch.bfloat16, dev, seed=14, sizes=[5, 0, 65537, 17])
    torch.library.opcheck(engine.total_norm, (tensors, 2.0, 1.0, True))
    torch.library.opcheck(engine.clip, ([t.clone() for t in tensors], 1.0, 2.0, False))
    torch.library.opcheck(engine.scale, ([t.clone() for t in tensors], coef(0.37, dev)))
    # The AMP arguments: found_inf is mutated (set to 1 by an inf among the elements).
    tensors[2][7] = math.inf
    amp = (torch.tensor(2.0**-8, device=dev), torch.zeros((), device=dev))
    torch.library.opcheck(engine.total_norm, (tensors, 2.0, 1.0, True, *amp))
    torch.library.opcheck(engine.clip, ([t.clone() for t in tensors], 1.0, 2.0, False, *amp))
    rows = torch.zeros((len(tensors), 2), dtype=torch.float64, device=dev)
    torch.library.opcheck(engine.partials, (tensors, 2.0, rows))
    torch.library.opcheck(engine.finish_partials, (rows, 2.0, 1.0, *amp))


def test_compiles_without_graph_breaks(engine, dev):
    def step(tensors):
        norm, c, _ = engine.total_norm(tensors, 2.0, 1.0, False)
        engine.scale(tensors, c)
        clipped, _ = engine.clip(tensors, 1.0, math.inf, False)
        return norm * 2, clipped

    tensors = random_tensors([9, 70000], torch.float32, dev, seed=15)
    before = [t.clone() for t in tensors]
    n2 = oracle_norm(before, 2.0)
    once = [oracle_clipped(t.cpu(), 1.0, n2) for t in before]
    ninf = oracle_norm(once, math.inf)
    norm, clipped = torch.compile(step, backend="aot_eager", fullgraph=True)(tensors)
    assert_norm_close(norm, 2 * n2)
    assert_norm_close(clipped, ninf)
    for t, t1 in zip(tensors, once):
        ulp_close(t, oracle_clipped(t1, 1.0, ninf))


# ---- CUDA only -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_5000_small_tensors(engine, dtype):
    gen = torch.Generator().manual_seed(16)
    sizes = torch.randint(1, 16385, (5000,), generator=gen).tolist()
    params = make_params([(n,) for n in sizes], dtype, "cuda", seed=16)
    before = [g.clone() for g in grads(params)]
    expected = oracle_norm(before, 2.0)
    norm = fusedclip.clip_grad_norm_(params, 1.0, backend=engine.name)
    assert_norm_close(norm, expected, dtype)
    for g, g0 in zip(grads(params), before):
        ulp_close(g, oracle_clipped(g0.cpu(), 1.0, expected))


@pytest.mark.gpu
def test_over_2_31_elements(engine):
    n = 2**31 + 2**16 + 3  # past int32 indexing, with a ragged last chunk (about 4.3 GB of bf16)
    if torch.cuda.mem_get_info()[0] < 3 * n * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    p = torch.nn.Parameter(torch.empty(0, device="cuda"))
    p.grad = torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda")
    p.grad[-1] = 3.0  # sum of squares = 0.25 * (n - 1) + 9, exactly
    expected = math.sqrt(0.25 * (n - 1) + 9.0)
    norm, _, _ = engine.total_norm([p.grad], 2.0, math.inf, False)
    assert_norm_close(norm, expected)
    fusedclip.clip_grad_norm_([p], 1.0, backend=engine.name)
    c = 1.0 / (expected + 1e-6)
    assert bool((p.grad[:-1] == torch.tensor(0.5 * c).to(torch.bfloat16).cuda()).all())
    assert float(p.grad[-1]) == float(torch.tensor(3.0 * c).to(torch.bfloat16))


@pytest.mark.gpu
def test_scale_over_2_31_elements(engine):
    n = 2**31 + 2**16 + 3  # past int32 indexing, with a ragged last chunk
    if torch.cuda.mem_get_info()[0] < 3 * n * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    t = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    t.view(-1)[: 2**20].normal_()
    t[2**20 :] = 1.5
    t[-5:] = torch.tensor([3.0, -2.0, 0.25, 7.0, -1.0])
    before = t.clone()
    engine.scale([t], coef(0.3, "cuda"))
    for start in range(0, n, 2**28):  # compare in slices so the fp64 temporaries stay small
        chunk = before[start : start + 2**28]
        assert torch.equal(t[start : start + 2**28], (chunk.double() * 0.3).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("build_in_capture", [False, True])
def test_cuda_graph_capture_and_replay(engine, build_in_capture):
    if build_in_capture and engine.name == "triton":
        pytest.skip("Triton's Python plan is uploaded with a blocking copy: refused in a capture "
                    "(test_triton_plan_built_inside_capture_is_a_clear_error)")
    params = make_params([(70000,), (3, 5), (0,), (300, 7)] + [(n % 50,) for n in range(200)],
                         torch.float32, "cuda", seed=17)
    pristine = [g.clone() for g in grads(params)]
    if build_in_capture:
        _lib.module().clear_plan_cache()
    else:
        fusedclip.clip_grad_norm_(params, 0.5, backend=engine.name)  # the plan exists before
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        norm = fusedclip.clip_grad_norm_(params, 0.5, backend=engine.name)
    for scale in (1.0, 3.0, 1e-3):  # clipping active, and a replay with nothing to clip
        for g, g0 in zip(grads(params), pristine):
            g.copy_(g0 * scale)
        before = [g.clone() for g in grads(params)]
        expected = oracle_norm(before, 2.0)
        graph.replay()  # the clip; its norm is the captured output
        assert_norm_close(norm, expected, torch.float32)
        for g, g0 in zip(grads(params), before):
            ulp_close(g, oracle_clipped(g0.cpu(), 0.5, expected))


@pytest.mark.gpu
def test_raw_capture_waits_for_an_eager_upload_still_queued_on_another_stream(engine):
    """A plan uploaded eagerly on one stream, then captured on another with a raw capture_begin
    (no device synchronization, unlike torch.cuda.graph): the graph waits for the upload's event
    (an external event node, csrc/cuda/engine_cuda.cpp), so a replay issued while the upload is
    still queued behind a long kernel reads the table only once it is written."""
    if engine.name != "cpp":
        pytest.skip("the compiled engine's table upload (Triton's is a blocking copy)")
    params = make_params([(70000,), (300, 7)] + [(n % 50 + 1,) for n in range(300)],
                         torch.float32, "cuda", seed=23)
    before = [g.clone() for g in grads(params)]
    expected = oracle_norm(before, 2.0)
    _lib.module().clear_plan_cache()
    uploader, capturer = torch.cuda.Stream(), torch.cuda.Stream()
    uploader.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(uploader):
        torch.cuda._sleep(200_000_000)  # about 0.1 s: the upload below stays queued behind it
        fusedclip.clip_grad_norm_(params, 1e30, backend="cpp")  # builds and uploads the plan
    graph = torch.cuda.CUDAGraph()
    capturer.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capturer):
        graph.capture_begin()
        norm = fusedclip.clip_grad_norm_(params, 0.5, backend="cpp")
        graph.capture_end()
    graph.replay()  # on the current stream, which never waited for `uploader`
    torch.cuda.synchronize()
    assert_norm_close(norm, expected, torch.float32)
    for g, g0 in zip(grads(params), before):
        ulp_close(g, oracle_clipped(g0.cpu(), 0.5, expected))


@pytest.mark.gpu
def test_scale_graph_capture_reads_coef_at_replay(engine):
    tensors = random_tensors([1000, 70000, 3] + [n % 50 for n in range(200)], torch.float32,
                             "cuda", seed=7)
    original = [t.clone() for t in tensors]
    c = coef(1.0, "cuda")
    engine.scale(tensors, c)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        engine.scale(tensors, c)
    c.fill_(0.5)
    graph.replay()
    assert_bitwise_equal([t.cpu() for t in tensors], [oracle_scaled(t.cpu(), 0.5)
                                                      for t in original])


@pytest.mark.gpu
def test_triton_plan_built_inside_capture_is_a_clear_error():
    tensors = tensors_for(torch.float32, "cuda", seed=11, sizes=[100, 33])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capturing"):
        with torch.cuda.graph(graph):
            torch.ops.fusedclip.triton_clip_(tensors, 1.0, 2.0, False)


@pytest.mark.gpu
def test_two_streams_share_a_plan(engine):
    """One plan used from a side stream, then from the main stream: the table is ready for both
    (csrc/cuda make_ready's event and recordStream branch) and both results are right."""
    params = make_params([(70000,), (300, 7), (5,)], torch.float32, "cuda", seed=21)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for stream in (side, torch.cuda.current_stream()):
        before = [g.clone() for g in grads(params)]
        expected = oracle_norm(before, 2.0)
        with torch.cuda.stream(stream):
            norm = fusedclip.clip_grad_norm_(params, 0.5, backend=engine.name)
        torch.cuda.current_stream().wait_stream(stream)
        assert_norm_close(norm, expected, torch.float32)
        for g, g0 in zip(grads(params), before):
            ulp_close(g, oracle_clipped(g0.cpu(), 0.5, expected))


@pytest.mark.gpu
def test_repeated_calls_with_changing_grads(engine):
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 7))
    model.cuda()
    for step in range(6):
        model.zero_grad(set_to_none=step % 2 == 0)  # new storages every other step
        model(torch.randn(32, 64, device="cuda")).square().sum().backward()
        before = [g.clone() for g in grads(list(model.parameters()))]
        expected = oracle_norm(before, 2.0)
        norm = fusedclip.clip_grad_norm_(model.parameters(), 0.5, backend=engine.name)
        assert_norm_close(norm, expected, torch.float32)
        for g, g0 in zip(grads(list(model.parameters())), before):
            ulp_close(g, oracle_clipped(g0.cpu(), 0.5, expected))


@pytest.mark.gpu
def test_default_backend_for_cuda_tensors_is_cpp():
    tensors = random_tensors([5], torch.float32, "cuda")
    if not fusedclip.available_backends()["cpp"].runs_on("cuda"):
        pytest.skip("fusedclip._C has no CUDA kernels here")
    assert fusedclip.select_backend(tensors) == "cpp"
