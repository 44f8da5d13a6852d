"""The fused engine (fusedclip._C: plans, pass 1, pass 2) against the fp64 oracle and the reference.

Every test here runs on the CPU, where the operators walk the same plan and table with the same
arithmetic as the CUDA kernels, and again on CUDA (marked ``gpu``), where the kernels run. The
public-API parity suite (test_parity.py) covers the engine on the CPU as well, through the
"cuda-ops-on-cpu" backend of conftest.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import (
    DTYPES,
    NORM_TYPES,
    SHAPE_CLASSES,
    assert_bitwise_equal,
    assert_clip_matches_reference,
    assert_norm_close,
    clone_params,
    grads,
    make_params,
    oracle_clipped,
    oracle_norm,
    random_tensors,
    ulp_close,
)

import fusedclip
from fusedclip import _extension, fused, ops, reference

if not _extension.loaded():
    if os.environ.get("FUSEDCLIP_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"fusedclip._C must be built here: {_extension.LOAD_ERROR}")
    pytest.skip(f"fusedclip._C is not built: {_extension.LOAD_ERROR}", allow_module_level=True)

C = _extension.module()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LAYOUTS = ["contiguous", "transposed", "offset"]
# Sizes around the chunk (65536 elements) and 16-byte boundaries, empty ones in between.
CHUNK_SIZES = [0, 1, 7, 8, 9, 0, 65535, 65536, 65537, 0, 2 * 65536 + 3]


def clip_params(params, max_norm, norm_type=2.0):
    """The one-call fast path (the one clip_grad_norm_ takes), on any device."""
    return fused.clip_params(params, max_norm, norm_type, cuda_only=False)


# ---- pass 1 and pass 2 against the oracle ------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape_class", sorted(SHAPE_CLASSES))
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_matches_oracle(device, dtype, norm_type, shape_class, layout):
    params = make_params(SHAPE_CLASSES[shape_class], dtype, device, seed=1, layout=layout)
    before = [g.clone() for g in grads(params)]
    expected = oracle_norm(before, norm_type)
    max_norm = 0.3 * expected
    norm = clip_params(params, max_norm, norm_type)
    assert norm is not None and norm.device.type == device and norm.dtype == dtype
    # Returned in the gradients' dtype, as torch does (an fp16 norm may overflow to inf).
    assert_norm_close(norm, float(torch.tensor(expected, dtype=torch.float64).to(dtype)), dtype)
    for g, g0 in zip(grads(params), before):
        ulp_close(g.cpu(), oracle_clipped(g0.cpu(), max_norm, expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_tensor_norms_and_coefficient(device, dtype, norm_type):
    tensors = random_tensors(CHUNK_SIZES, dtype, device, seed=2)
    norm, coef, per = ops.total_norm(tensors, norm_type, 0.5, per_tensor=True)
    expected = oracle_norm(tensors, norm_type)
    assert_norm_close(norm, expected)
    assert coef.dtype == torch.float64 and coef.device.type == device
    torch.testing.assert_close(float(coef), min(1.0, 0.5 / (expected + 1e-6)), rtol=1e-12, atol=0)
    assert per.shape == (len(tensors),)
    for t, n in zip(tensors, per.tolist()):
        torch.testing.assert_close(n, oracle_norm([t], norm_type), rtol=1e-12, atol=0)
    # Asking for no per-tensor norms changes nothing else.
    norm2, coef2, per2 = ops.total_norm(tensors, norm_type, 0.5)
    assert per2.numel() == 0
    assert_bitwise_equal([norm2, coef2], [norm, coef])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 1.5, 8.0])
@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 3e38])
def test_extreme_magnitudes_neither_overflow_nor_underflow(device, norm_type, magnitude):
    # fp32 values whose powers leave fp32 range (and, for p = 8, fp64 range).
    tensors = random_tensors([100, 65537, 3], torch.float32, device, seed=3, scale=magnitude / 4)
    tensors = [t.clamp(-3e38, 3e38) for t in tensors]
    norm, _, _ = ops.total_norm(tensors, norm_type)
    assert_norm_close(norm, oracle_norm(tensors, norm_type))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 3.0])
def test_fp64_gradients_past_fp64_square_range(device, norm_type):
    tensors = random_tensors([1000, 77], torch.float64, device, seed=4, scale=1e200)
    norm, _, _ = ops.total_norm(tensors, norm_type)
    assert math.isfinite(float(norm))
    assert_norm_close(norm, oracle_norm(tensors, norm_type))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("bad", ["nan", "inf", "both"])
def test_nonfinite_norm(device, norm_type, bad):
    tensors = random_tensors([70000, 5, 300], torch.bfloat16, device, seed=5)
    if bad in ("inf", "both"):
        tensors[0][66000] = -math.inf
    if bad in ("nan", "both"):
        tensors[2][17] = math.nan
    norm, coef, per = ops.total_norm(tensors, norm_type, 1.0, per_tensor=True)
    expected = math.inf if bad == "inf" else math.nan
    assert_norm_close(norm, expected)
    assert_norm_close(coef, 0.0 if bad == "inf" else math.nan)
    assert_norm_close(per[1], oracle_norm([tensors[1]], norm_type))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_share_one_reduction(device):
    tensors = []
    for i, dtype in enumerate([torch.bfloat16, torch.float32, torch.float16, torch.float64] * 3):
        tensors += random_tensors([i * 997 % 70001, 3], dtype, device, seed=6 + i)
    for norm_type in NORM_TYPES:
        norm, _, per = ops.total_norm(tensors, norm_type, per_tensor=True)
        assert_norm_close(norm, oracle_norm(tensors, norm_type))
        for t, n in zip(tensors, per.tolist()):
            torch.testing.assert_close(n, oracle_norm([t], norm_type), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_all_empty_tensors(device):
    tensors = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    norm, coef, per = ops.total_norm(tensors, 2.0, 1.0, per_tensor=True)
    assert float(norm) == 0.0 and float(coef) == 1.0 and per.tolist() == [0.0, 0.0]
    ops.clip_(tensors, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_element_is_written(device, dtype):
    # Distinct nonzero values everywhere, so an element the rescale skipped cannot pass.
    tensors = random_tensors(CHUNK_SIZES, dtype, device, seed=7)
    tensors = [t.abs().add_(0.5) for t in tensors]
    expected = [t.clone() for t in tensors]
    ops.scale_(tensors, torch.tensor(0.5, dtype=torch.float64, device=device))
    reference.scale_(expected, torch.tensor(0.5, dtype=torch.float64))
    assert_bitwise_equal(tensors, expected)
    assert all(bool((t != e * 2).all()) for t, e in zip(tensors, expected) if t.numel())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_over_runs(device, dtype):
    params = make_params([(n * 7919 % 200003,) for n in range(40)], dtype, device, seed=8)
    pristine = [g.clone() for g in grads(params)]
    results = []
    for _ in range(10):
        for g, g0 in zip(grads(params), pristine):
            g.copy_(g0)
        norm = clip_params(params, 1.0, 2.0)
        results.append([norm] + [g.clone() for g in grads(params)])
    for r in results[1:]:
        assert_bitwise_equal(r, results[0])


# ---- the plan cache ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_plan_is_reused_while_grads_are_unchanged(device):
    params = make_params(SHAPE_CLASSES["several"], torch.float32, device, seed=9)
    clip_params(params, 1e9)
    built = C.plans_built()
    for _ in range(3):
        clip_params(params, 1e9)
        ops.clip_(grads(params), 1e9)
        ops.total_norm(grads(params), 2.0)
    assert C.plans_built() == built


@pytest.mark.parametrize("device", DEVICES)
def test_reallocated_empty_grads_keep_the_plan(device):
    params = make_params([(5,), (0,), (3, 0)], torch.float32, device, seed=18)
    clip_params(params, 1.0)
    built = C.plans_built()
    params[1].grad = torch.empty(0, device=device)  # another (empty) tensor: nothing to read
    clip_params(params, 1.0)
    assert C.plans_built() == built


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "change", [reallocate, new_storage_in_place, resize, set_none, swap_two, change_dtype]
)
def test_plan_is_rebuilt_when_a_grad_changes(device, change):
    shapes = [(70000,), (3, 5), (257,), (257,)]
    params = make_params(shapes, torch.float32, device, seed=10)
    # Freed memory gets reused: a plan cached by an earlier test could match the changed keys
    # (correctly: same addresses, sizes, dtypes), which would hide the build this test counts.
    C.clear_plan_cache()
    clip_params(params, 1e9)
    built = C.plans_built()
    change(params)
    twin = clone_params(params)
    before = [g.clone() for g in grads(params)]
    norm = clip_params(params, 0.1)
    assert C.plans_built() == built + 1
    expected = reference.clip_(grads(twin), 0.1, 2.0)
    assert_norm_close(norm, float(expected), before[0].dtype)
    for g, g0 in zip(grads(params), before):
        ulp_close(g.cpu(), oracle_clipped(g0.cpu(), 0.1, float(expected)))


@pytest.mark.parametrize("device", DEVICES)
def test_writes_bump_version_counters(device):
    params = make_params(SHAPE_CLASSES["several"], torch.float32, device, seed=11)
    versions = [g._version for g in grads(params)]
    clip_params(params, 0.1)
    assert all(g._version > v for g, v in zip(grads(params), versions))
    versions = [g._version for g in grads(params)]
    ops.clip_(grads(params), 0.1)
    assert all(g._version > v for g, v in zip(grads(params), versions))


# ---- what the fast path hands to the general path, and what it refuses ------------------------

def test_fast_path_declines_what_it_cannot_take():
    dense = make_params([(4, 3)], seed=12)
    gapped = make_params([(4, 3)], seed=12, layout="strided")
    sparse = torch.nn.Parameter(torch.zeros(4))
    sparse.grad = torch.ones(4).to_sparse()
    complex_ = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    complex_.grad = torch.ones(4, dtype=torch.complex64)
    no_grad = torch.nn.Parameter(torch.zeros(2))
    assert clip_params(dense, 1.0) is not None
    for params in (gapped, [sparse], [complex_], [no_grad], [], dense + ["not a tensor"]):
        assert clip_params(params, 1.0) is None
    assert fused.clip_params(dense, 1.0, 2.0) is None  # CPU tensors, cuda_only=True
    assert clip_params(tuple(dense), 1.0) is None  # lists only


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_sharing_memory_are_refused_untouched(device):
    p = torch.nn.Parameter(torch.zeros(10, device=device))
    p.grad = torch.randn(10, device=device)
    storage = torch.randn(20, device=device)
    a = torch.nn.Parameter(torch.zeros(8, device=device))
    b = torch.nn.Parameter(torch.zeros(8, device=device))
    a.grad, b.grad = storage[:8], storage[4:12]
    for params in ([p, p], [a, b]):
        before = [g.clone() for g in grads(params)]
        with pytest.raises(ValueError, match="share memory"):
            clip_params(params, 1e-3)
        with pytest.raises(ValueError, match="share memory"):
            ops.clip_(grads(params), 1e-3)
        if device == "cuda":
            with pytest.raises(ValueError, match="share memory"):
                fusedclip.clip_grad_norm_(params, 1e-3)
        assert_bitwise_equal(grads(params), before)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: ops.total_norm(t, 0.0), "norm_type must be > 0"),
        (lambda t: ops.total_norm(t, math.nan), "norm_type must be > 0"),
        (lambda t: ops.clip_(t, -1.0), "max_norm must be >= 0"),
        (lambda t: ops.clip_(t, math.nan), "max_norm must be >= 0"),
        (lambda t: ops.clip_([*t, torch.ones(3, dtype=torch.int64)], 1.0), "has dtype Long"),
        (lambda t: ops.clip_([*t, torch.ones(4, 4)[:, ::2]], 1.0), "view with gaps"),
        (lambda t: ops.clip_([], 1.0), "no tensor arguments"),
    ],
)
def test_operators_reject_bad_arguments_untouched(call, match):
    tensors = random_tensors([5, 70000], torch.float32, "cpu", seed=13)
    before = [t.clone() for t in tensors]
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(tensors)
    assert_bitwise_equal(tensors, before)


# ---- torch.compile and opcheck -----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    tensors = random_tensors([5, 0, 65537, 17], torch.bfloat16, device, seed=14)
    torch.library.opcheck(torch.ops.fusedclip.total_norm, (tensors, 2.0, 1.0, True))
    torch.library.opcheck(torch.ops.fusedclip.clip_, (tensors, 1.0, 2.0, False))
    # The AMP arguments: found_inf is mutated (set to 1 by an inf among the elements).
    tensors[2][7] = math.inf
    amp = (torch.tensor(2.0**-8, device=device), torch.zeros((), device=device))
    torch.library.opcheck(torch.ops.fusedclip.total_norm, (tensors, 2.0, 1.0, True, *amp))
    torch.library.opcheck(torch.ops.fusedclip.clip_, (tensors, 1.0, 2.0, False, *amp))


def test_compiles_without_graph_breaks():
    def step(tensors):
        norm, coef, _ = ops.total_norm(tensors, 2.0, 1.0)
        ops.scale_(tensors, coef)
        clipped, _ = ops.clip_(tensors, 1.0, math.inf)
        return norm * 2, clipped

    tensors = random_tensors([9, 70000], torch.float32, "cpu", seed=15)
    expected = [t.clone() for t in tensors]
    n_ref = reference.clip_(expected, 1.0, 2.0)
    c_ref = reference.clip_(expected, 1.0, math.inf)
    norm, clipped = torch.compile(step, backend="aot_eager", fullgraph=True)(tensors)
    torch.testing.assert_close(norm, n_ref * 2)
    torch.testing.assert_close(clipped, c_ref)
    for t, e in zip(tensors, expected):
        ulp_close(t, e)


# ---- CUDA only -----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_backend_is_the_default_for_cuda_tensors():
    tensors = random_tensors([5], torch.float32, "cuda")
    assert fusedclip.backends.select(None, tensors) is fused
    assert fusedclip.available_backends()["cuda"].available


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_5000_small_tensors(dtype):
    gen = torch.Generator().manual_seed(16)
    sizes = torch.randint(1, 16385, (5000,), generator=gen).tolist()
    params = make_params([(n,) for n in sizes], dtype, "cuda", seed=16)
    assert_clip_matches_reference(lambda _: fusedclip.clip_grad_norm_(params, 1.0), grads(params),
                                  1.0, dtype)


@pytest.mark.gpu
def test_over_2_31_elements():
    n = 2**31 + 2**16 + 3  # past int32 indexing, with a ragged last chunk (about 4.3 GB of bf16)
    if torch.cuda.mem_get_info()[0] < 3 * n * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    p = torch.nn.Parameter(torch.empty(0, device="cuda"))
    p.grad = torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda")
    p.grad[-1] = 3.0  # sum of squares = 0.25 * (n - 1) + 9, exactly
    expected = math.sqrt(0.25 * (n - 1) + 9.0)
    norm, _, _ = ops.total_norm([p.grad], 2.0)
    assert_norm_close(norm, expected)
    fusedclip.clip_grad_norm_([p], 1.0)
    coef = 1.0 / (expected + 1e-6)
    assert bool((p.grad[:-1] == torch.tensor(0.5 * coef).to(torch.bfloat16).cuda()).all())
    assert float(p.grad[-1]) == float(torch.tensor(3.0 * coef).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("build_in_capture", [False, True])
def test_cuda_graph_capture_and_replay(build_in_capture):
    params = make_params([(70000,), (3, 5), (0,), (300, 7)] + [(n % 50,) for n in range(200)],
                         torch.float32, "cuda", seed=17)
    pristine = [g.clone() for g in grads(params)]
    if build_in_capture:
        C.clear_plan_cache()
    else:
        fusedclip.clip_grad_norm_(params, 0.5)  # warm up: the plan exists before the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        norm = fusedclip.clip_grad_norm_(params, 0.5)
    for scale in (1.0, 3.0, 1e-3):  # clipping active, and a replay with nothing to clip
        for g, g0 in zip(grads(params), pristine):
            g.copy_(g0 * scale)
        # The clip is the replay (which returns None), its norm the captured output.
        assert_clip_matches_reference(lambda _: graph.replay() or norm, grads(params), 0.5,
                                      torch.float32)


@pytest.mark.gpu
def test_repeated_calls_with_changing_grads():
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 7))
    model.cuda()
    for step in range(6):
        model.zero_grad(set_to_none=step % 2 == 0)  # new storages every other step
        model(torch.randn(32, 64, device="cuda")).square().sum().backward()
        twin = [g.clone() for g in grads(list(model.parameters()))]
        norm = fusedclip.clip_grad_norm_(model.parameters(), 0.5)
        expected = reference.clip_(twin, 0.5, 2.0)
        assert_norm_close(norm, float(expected), torch.float32)
        for g, e in zip(grads(list(model.parameters())), twin):
            ulp_close(g, e)
