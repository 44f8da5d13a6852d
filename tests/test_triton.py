"""The Triton backend against the fp64 oracle and the reference.

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), on
small inputs: that is how CI tests their logic. With a GPU the same tests run on CUDA (marked
``gpu``). test_parity.py also runs its CPU suite through ``backend="triton"``, and
``test_kernels_compile_for_sm90`` compiles the real kernels for an H100 without needing one.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    DTYPES,
    NORM_TYPES,
    assert_bitwise_equal,
    assert_clip_matches_reference,
    assert_norm_close,
    grads,
    make_params,
    oracle_clipped,
    oracle_norm,
    ulp_close,
)

import fusedclip
from fusedclip import _extension, reference, triton_backend

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

pytestmark = pytest.mark.triton
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not triton_backend.interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
# Around the tile (4096) and chunk (65536) sizes, empty tensors in between.
SIZES = [0, 1, 7, 8, 9, 0, 4095, 4096, 4097, 65537, 0, 2 * 65536 + 3]


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_matches_oracle(device, dtype, norm_type):
    tensors = tensors_for(dtype, device, seed=1)
    before = [t.clone() for t in tensors]
    expected = oracle_norm(before, norm_type)
    norm = triton_backend.clip_(tensors, 0.3 * expected, norm_type)
    assert norm.dtype == torch.float64 and norm.device.type == device
    assert_norm_close(norm, expected)
    for t, t0 in zip(tensors, before):
        ulp_close(t.cpu(), oracle_clipped(t0.cpu(), 0.3 * expected, expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_per_tensor_norms_and_coefficient(device, norm_type):
    tensors = tensors_for(torch.float32, device, seed=2)
    plan = triton_backend.plan_for(tensors)
    r = triton_backend.norm_pass(
        plan, triton_backend.Request(norm_type, 0.5, per_tensor=True, out_dtype=torch.bfloat16))
    norm, coef, out, per = r.norm, r.coef, r.out, r.per_tensor
    expected = oracle_norm(tensors, norm_type)
    assert_norm_close(norm, expected)
    assert out.dtype == torch.bfloat16
    assert float(out) == float(torch.tensor(expected).to(torch.bfloat16))
    torch.testing.assert_close(float(coef), min(1.0, 0.5 / (expected + 1e-6)), rtol=1e-12, atol=0)
    for t, n in zip(tensors, per.tolist()):
        torch.testing.assert_close(n, oracle_norm([t], norm_type), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_mixed_dtypes(device):
    sizes = [(n * 7919) % 3001 for n in range(300)]  # ~450k elements in 300 tensors
    tensors = []
    for i, dtype in enumerate(DTYPES):
        tensors += tensors_for(dtype, device, seed=3 + i, sizes=sizes[i::4])
    assert_clip_matches_reference(lambda ts: triton_backend.clip_(ts, 1.0, 2.0), tensors, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("bad", ["nan", "inf", "both"])
def test_nonfinite_norm(device, norm_type, bad):
    tensors = tensors_for(torch.bfloat16, device, seed=4, sizes=[70000, 5, 300])
    if bad in ("inf", "both"):
        tensors[0][66000] = -math.inf
    if bad in ("nan", "both"):
        tensors[2][17] = math.nan
    r = triton_backend.norm_pass(triton_backend.plan_for(tensors), triton_backend.Request(
        norm_type, 1.0, per_tensor=True, out_dtype=torch.float32))
    norm, coef, per = r.norm, r.coef, r.per_tensor
    assert_norm_close(norm, math.inf if bad == "inf" else math.nan)
    assert_norm_close(coef, 0.0 if bad == "inf" else math.nan)
    assert_norm_close(per[1], oracle_norm([tensors[1]], norm_type))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 1.5, 8.0])
@pytest.mark.parametrize("magnitude", [1e-30, 3e38])
def test_extreme_magnitudes(device, norm_type, magnitude):
    tensors = [t.clamp(-3e38, 3e38) for t in
               tensors_for(torch.float32, device, seed=5, sizes=[100, 5000], scale=magnitude / 4)]
    norm = triton_backend.total_norm(tensors, norm_type)
    assert_norm_close(norm, oracle_norm(tensors, norm_type))


def plans_built() -> int:
    """Plans built so far by the plan cache clip_grad_norm_(backend="triton") uses: fusedclip._C's
    when it is built (its C++ path), else the Triton backend's own."""
    if _extension.loaded():
        return _extension.module().plans_built()
    return triton_backend.plans_built


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_plan_reused(device):
    params = make_params([(n * 389 % 70001,) for n in range(12)], torch.bfloat16, device, seed=6)
    pristine = [g.clone() for g in grads(params)]
    twin = [g.clone() for g in pristine]
    expected = reference.clip_(twin, 1.0, 2.0)
    results, built = [], None
    for _ in range(3):
        for g, g0 in zip(grads(params), pristine):
            g.copy_(g0)
        norm = fusedclip.clip_grad_norm_(params, 1.0, backend="triton")
        results.append([norm] + [g.clone() for g in grads(params)])
        built = plans_built() if built is None else built
    assert plans_built() == built
    assert_norm_close(results[0][0], float(expected), torch.bfloat16)
    for g, e in zip(results[0][1:], twin):
        ulp_close(g, e)
    for r in results[1:]:
        assert_bitwise_equal(r, results[0])
    params[3].grad = params[3].grad.clone()  # a reallocated gradient gets a new plan
    if _extension.loaded():  # (not one an earlier test left behind for recycled memory)
        _extension.module().clear_plan_cache()
    triton_backend._PLANS.clear()
    fusedclip.clip_grad_norm_(params, 1.0, backend="triton")
    assert plans_built() == built + 1


@pytest.mark.parametrize("device", DEVICES)
def test_python_plan_matches_the_cpp_plan_path(device):
    if not _extension.loaded():
        pytest.skip("fusedclip._C is not built")
    params = make_params([(70000,), (5, 3), (0,), (4099,)], torch.float16, device, seed=12,
                         layout="offset")
    tensors = [g.clone() for g in grads(params)]
    via_cpp = triton_backend.clip_params(params, 0.5, 2.0, cuda_only=False)
    via_python = triton_backend.clip_(tensors, 0.5, 2.0)
    assert via_cpp is not None and via_cpp.dtype == torch.float16
    assert float(via_cpp) == float(via_python.to(torch.float16))
    assert_bitwise_equal(grads(params), tensors)


def test_chunk_size_matches_the_cpp_plan():
    # The Triton kernels walk the C++ plan's table when fusedclip._C is built.
    from fusedclip.triton_kernels.table import CHUNK

    if not _extension.loaded():
        pytest.skip("fusedclip._C is not built")
    assert _extension.module().CHUNK_ELEMS == CHUNK


@pytest.mark.parametrize("norm_type, max_norm", [(2.0, 5e-324), (5e-324, 1.0), (1.0, 1.0)])
def test_scalars_that_are_integers_one_in_bits(norm_type, max_norm):
    # 5e-324 is the fp64 whose bits are the integer 1, which Triton would compile as a constant.
    tensors = tensors_for(torch.float32, "cuda" if torch.cuda.is_available() else "cpu", seed=13,
                          sizes=[300, 7])
    r = triton_backend.norm_pass(triton_backend.plan_for(tensors),
                                 triton_backend.Request(norm_type, max_norm))
    norm, coef = r.norm, r.coef
    assert_norm_close(norm, oracle_norm(tensors, norm_type))
    torch.testing.assert_close(float(coef), min(1.0, max_norm / (float(norm) + 1e-6)), rtol=1e-12,
                               atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_sharing_memory_are_refused_untouched(device):
    storage = torch.randn(20, device=device)
    before = storage.clone()
    with pytest.raises(ValueError, match="share memory"):
        triton_backend.clip_([storage[:8], storage[4:12]], 1e-3, 2.0)
    assert_bitwise_equal([storage], [before])


def test_opcheck_and_compile():
    tensors = tensors_for(torch.float32, "cpu", seed=7, sizes=[5, 70000, 0, 17])
    if not triton_backend.interpreting():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    torch.library.opcheck(torch.ops.fusedclip.triton_total_norm, (tensors, 2.0, 1.0, True))
    torch.library.opcheck(torch.ops.fusedclip.triton_clip_, ([t.clone() for t in tensors], 1.0,
                                                             2.0))
    amp = (torch.tensor(2.0**-8), torch.zeros(()))
    torch.library.opcheck(torch.ops.fusedclip.triton_total_norm, (tensors, 2.0, 1.0, True, *amp))
    torch.library.opcheck(torch.ops.fusedclip.triton_clip_, ([t.clone() for t in tensors], 1.0,
                                                             2.0, *amp))

    def step(ts):
        return torch.ops.fusedclip.triton_clip_(ts, 1.0, 2.0) * 2

    expected = [t.clone() for t in tensors]
    n_ref = reference.clip_(expected, 1.0, 2.0)
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(tensors)
    torch.testing.assert_close(out, n_ref * 2)
    for t, e in zip(tensors, expected):
        ulp_close(t, e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    """The kernels compile for an H100 (Triton needs no GPU for that), and the aligned variants
    use 16-byte vector loads and stores."""
    script = textwrap.dedent("""
        import re, triton, triton.language as tl
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        from fusedclip.triton_kernels import norm, scale
        from fusedclip.triton_kernels.table import CHUNK

        def ptx(fn, sig, consts, warps=8):
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            return k.asm["ptx"]

        part = {"table": "*i64", "n_tensors": "i32", "chunk_lo": "i32", "partials": "*fp64",
                "p_bits": "i64"}
        tile = {"CHUNK": CHUNK, "BLOCK": norm.BLOCK}
        variants = [(tl.bfloat16, 1, True, True), (tl.float32, 2, False, True),
                    (tl.float16, 3, False, False), (tl.float64, 1, False, True)]
        for dt, kind, plain, aligned in variants:
            code = ptx(norm.chunk_partials, part, {"DT": dt, "KIND": kind, "PLAIN": plain,
                                                   "ALIGNED": aligned, **tile})
            if aligned:  # 16-byte vectors: v4 of 32-bit words, or v2 of 64-bit ones
                assert re.search(r"ld\\.global[.\\w]*\\.v(4\\.b32|2\\.b64)", code), (dt, kind)
        fin = {"partials": "*fp64", "num_chunks": "i32", "p_bits": "i64", "max_norm_bits": "i64",
               "norm_ptr": "*fp64", "coef_ptr": "*fp64", "out_ptr": "*bf16",
               "inv_ptr": "*fp64", "found_ptr": "*fp64"}
        plain = {"UNSCALE": False, "FLAG": False, "MODE": 0}
        ptx(norm.finish, fin, {"KIND": 1, "OUT_DT": tl.bfloat16, "FBLOCK": norm.FBLOCK, **plain})
        amp = {**fin, "out_ptr": "*fp32", "inv_ptr": "*fp32", "found_ptr": "*fp32"}
        code = ptx(norm.finish, amp, {"KIND": 3, "OUT_DT": tl.float32, "FBLOCK": norm.FBLOCK,
                                      "UNSCALE": True, "FLAG": True, "MODE": 1})
        assert "cvt.f64.f32" in code  # the AMP variant reads the fp32 inverse scale
        per = {"table": "*i64", "n_tensors": "i32", "partials": "*fp64", "p_bits": "i64",
               "out_ptr": "*fp64", "inv_ptr": "*fp32", "max_norms_ptr": "*fp64",
               "coef_ptr": "*fp64", "max_norm_bits": "i64", "eps_bits": "i64",
               "factor_bits": "i64"}
        for unscale, coef, mode in ((False, 0, 0), (True, 1, 1), (False, 2, 0), (False, 2, 2)):
            ptx(norm.per_tensor_norms, per, {"KIND": 2 if coef == 0 else 1, "CHUNK": CHUNK,
                                             "FBLOCK": norm.FBLOCK, "UNSCALE": unscale,
                                             "COEF": coef, "MODE": mode}, warps=4)
        sc = {"table": "*i64", "n_tensors": "i32", "chunk_lo": "i32", "coef_ptr": "*fp64"}
        for per_tensor in (False, True):
            code = ptx(scale.scale, sc, {"DT": tl.bfloat16, "ALIGNED": True,
                                         "PER_TENSOR": per_tensor, **tile})
            assert "st.global.v4" in code and "ld.global.v4" in code
        ptx(scale.scale, sc, {"DT": tl.float64, "ALIGNED": False, "PER_TENSOR": False, **tile})
        cl = {"table": "*i64", "n_tensors": "i32", "chunk_lo": "i32", "bound_bits": "i64",
              "neg_bound_bits": "i64"}
        for dt in (tl.bfloat16, tl.float16, tl.float32):
            code = ptx(scale.clamp, cl, {"DT": dt, "ALIGNED": True, "CUDA_RULE": True, **tile})
            assert "st.global.v4" in code and "ld.global.v4" in code, dt
        ptx(scale.clamp, cl, {"DT": tl.float64, "ALIGNED": False, "CUDA_RULE": True, **tile})
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


# ---- CUDA only -----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_5000_small_tensors():
    gen = torch.Generator().manual_seed(8)
    sizes = torch.randint(1, 16385, (5000,), generator=gen).tolist()
    tensors = tensors_for(torch.bfloat16, "cuda", seed=8, sizes=sizes)
    assert_clip_matches_reference(lambda ts: triton_backend.clip_(ts, 1.0, 2.0), tensors, 1.0)


@pytest.mark.gpu
def test_coefficient_one_writes_nothing():
    tensors = tensors_for(torch.bfloat16, "cuda", seed=9)
    for t in tensors:
        if t.numel():
            t.view(torch.int16)[0] = 0x7FD2  # a NaN payload a GPU multiply would not keep
    before = [t.clone() for t in tensors]
    triton_backend.scale_(tensors, torch.tensor(1.0, dtype=torch.float64, device="cuda"))
    assert_bitwise_equal(tensors, before, nan_payloads=True)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    params = make_params([(70000,), (3, 5), (0,), (300, 7)], torch.float32, "cuda", seed=10)
    pristine = [g.clone() for g in grads(params)]
    fusedclip.clip_grad_norm_(params, 0.5, backend="triton")  # builds the plan
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = fusedclip.clip_grad_norm_(params, 0.5, backend="triton")
    for scale in (1.0, 1e-3):
        for g, g0 in zip(grads(params), pristine):
            g.copy_(g0 * scale)
        # The clip is the replay (which returns None), its norm the captured output.
        assert_clip_matches_reference(lambda _: graph.replay() or norm, grads(params), 0.5,
                                      torch.float32)


@pytest.mark.gpu
def test_plan_built_inside_capture_is_a_clear_error():
    tensors = tensors_for(torch.float32, "cuda", seed=11, sizes=[100, 33])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capturing"):
        with torch.cuda.graph(graph):
            triton_backend.clip_(tensors, 1.0, 2.0)
