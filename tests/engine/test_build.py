"""What was built, and that it is what the backends expect: fusedclip._C's operators, schemas and
fake implementations, its module attributes, and the Triton kernels compiled for an H100 (Triton
needs no GPU to compile).

CI builds the extension and sets FUSEDCLIP_REQUIRE_EXTENSION=1 (see conftest), so a missing build
fails there instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fusedclip
from fusedclip.backends import _schema
from fusedclip.backends.cpp import _lib

needs_extension = pytest.mark.skipif(not _lib.loaded(),
                                     reason=f"fusedclip._C is not built ({_lib.LOAD_ERROR})")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


@needs_extension
def test_operators_are_registered_with_their_fakes():
    assert set(_schema.OPS) <= set(_lib.op_names())
    schema = str(torch.ops.fusedclip.scale_.default._schema)
    assert "Tensor(a!)[] tensors" in schema
    assert "fusedclip._C is built" in fusedclip.available_backends()["cpp"].reason
    for op in _schema.OPS:  # what torch.compile traces them with
        assert torch._library.simple_registry.singleton.find(
            f"fusedclip::{op}").fake_impl.kernel is not None, op


@needs_extension
@needs_triton
def test_both_backends_share_one_schema_per_operator():
    for op in _schema.OPS:
        cpp = torch.ops.fusedclip.__getattr__(op).default._schema
        triton = torch.ops.fusedclip.__getattr__(f"triton_{op}").default._schema
        assert [(a.name, str(a.type), a.default_value) for a in cpp.arguments] == \
            [(a.name, str(a.type), a.default_value) for a in triton.arguments], op
        assert [str(r.type) for r in cpp.returns] == [str(r.type) for r in triton.returns], op


@needs_extension
def test_module_attributes():
    module = _lib.module()
    assert module.CHUNK_ELEMS == 1 << 16
    assert isinstance(module.CUDA_KERNELS, bool)
    assert fusedclip.available_backends()["cpp"].runs_on("cpu")
    if torch.cuda.is_available():
        assert fusedclip.available_backends()["cpp"].runs_on("cuda") == module.CUDA_KERNELS


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    """The kernels compile for an H100 (Triton needs no GPU for that), and the aligned variants
    use 16-byte vector loads and stores."""
    script = textwrap.dedent("""
        import re, triton, triton.language as tl
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        from fusedclip.triton_kernels import finish, norm, scale
        from fusedclip.backends.triton.plan import CHUNK

        def ptx(fn, sig, consts, warps=8):
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            return k.asm["ptx"]

        part = {"table": "*i64", "n_tensors": "i32", "chunk_lo": "i32", "partials": "*fp64",
                "p_bits": "i64"}
        tile = {"CHUNK": CHUNK, "BLOCK": norm.BLOCK, "DEPTH": 2}
        vec = lambda dt: {"VEC": 16 // (dt.primitive_bitwidth // 8)}
        variants = [(tl.bfloat16, 1, True, True), (tl.float32, 2, False, True),
                    (tl.float16, 3, False, False), (tl.float64, 1, False, True)]
        for dt, kind, plain, aligned in variants:
            code = ptx(norm.chunk_partials, part, {"DT": dt, "KIND": kind, "PLAIN": plain,
                                                   "ALIGNED": aligned, **tile, **vec(dt)})
            if aligned:  # 16-byte vectors: v4 of 32-bit words, or v2 of 64-bit ones
                assert re.search(r"ld\\.global[.\\w]*\\.v(4\\.b32|2\\.b64)", code), (dt, kind)
        fin = {"partials": "*fp64", "num_chunks": "i32", "p_bits": "i64", "max_norm_bits": "i64",
               "norm_ptr": "*fp64", "coef_ptr": "*fp64", "out_ptr": "*bf16",
               "inv_ptr": "*fp64", "found_ptr": "*fp64"}
        plain = {"UNSCALE": False, "FLAG": False, "MODE": 0}
        ptx(finish.finish, fin, {"KIND": 1, "OUT_DT": tl.bfloat16, "FBLOCK": finish.FBLOCK,
                                 **plain})
        amp = {**fin, "out_ptr": "*fp32", "inv_ptr": "*fp32", "found_ptr": "*fp32"}
        code = ptx(finish.finish, amp, {"KIND": 3, "OUT_DT": tl.float32, "FBLOCK": finish.FBLOCK,
                                      "UNSCALE": True, "FLAG": True, "MODE": 1})
        assert "cvt.f64.f32" in code  # the AMP variant reads the fp32 inverse scale
        per = {"table": "*i64", "n_tensors": "i32", "partials": "*fp64", "p_bits": "i64",
               "out_ptr": "*fp64", "inv_ptr": "*fp32", "max_norms_ptr": "*fp64",
               "coef_ptr": "*fp64", "max_norm_bits": "i64", "eps_bits": "i64",
               "factor_bits": "i64"}
        for unscale, coef, mode in ((False, 0, 0), (True, 1, 1), (False, 2, 0), (False, 2, 2)):
            ptx(finish.per_tensor_norms, per, {"KIND": 2 if coef == 0 else 1, "CHUNK": CHUNK,
                                             "FBLOCK": finish.FBLOCK, "UNSCALE": unscale,
                                             "COEF": coef, "MODE": mode}, warps=4)
        sc = {"table": "*i64", "n_tensors": "i32", "chunk_lo": "i32", "chunk_hi": "i32",
              "coef_ptr": "*fp64"}
        for per_tensor in (False, True):
            code = ptx(scale.scale, sc, {"DT": tl.bfloat16, "ALIGNED": True,
                                         "PER_TENSOR": per_tensor, **tile, **vec(tl.bfloat16)})
            assert "st.global.v4" in code and "ld.global.v4" in code
        ptx(scale.scale, sc, {"DT": tl.float64, "ALIGNED": False, "PER_TENSOR": False, **tile,
                              **vec(tl.float64)})
        cl = {"table": "*i64", "n_tensors": "i32", "chunk_lo": "i32", "bound_bits": "i64",
              "neg_bound_bits": "i64"}
        for dt in (tl.bfloat16, tl.float16, tl.float32):
            code = ptx(scale.clamp, cl, {"DT": dt, "ALIGNED": True, "CUDA_RULE": True, **tile,
                                         **vec(dt)})
            assert "st.global.v4" in code and "ld.global.v4" in code, dt
        ptx(scale.clamp, cl, {"DT": tl.float64, "ALIGNED": False, "CUDA_RULE": True, **tile,
                              **vec(tl.float64)})
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


_SASS_SCRIPT = textwrap.dedent("""
    import json, os, re, subprocess, sys, tempfile, triton, triton.language as tl
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from fusedclip.triton_kernels import norm, pair, scale
    from fusedclip.backends.triton import Variant
    from fusedclip.backends.triton.plan import CHUNK
    import torch

    BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    v = Variant()  # the default: what the backend launches without FUSEDCLIP_TRITON_VARIANT

    def sass(fn, sig, consts):
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                        constexprs={(fn.arg_names.index(k),): c for k, c in consts.items()})
        opts = {"num_warps": v.warps, **({"maxnreg": v.maxnreg} if v.maxnreg else {})}
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        run = lambda flag: subprocess.run([os.path.join(BIN, "cuobjdump"), flag, f.name],
                                          check=True, capture_output=True, text=True).stdout
        code, usage = run("-sass"), run("-res-usage")
        os.unlink(f.name)
        ins = [m.group(1).strip() for m in re.finditer(r"/\\*[0-9a-f]{4,}\\*/\\s+([^;]*);", code)]
        return ins, int(re.search(r"REG:(\\d+)", usage).group(1)), \
            int(re.search(r"STACK:(\\d+)", usage).group(1))

    def in_flight(ins):
        # For each run of LDG.E.128: (predicated?, how many are issued before the first
        # instruction that reads a register one of them loaded, or a branch or barrier).
        runs, i = [], 0
        while i < len(ins):
            if not re.match(r"(@!?P\\w+ )?LDG\\.E\\.128 ", ins[i]):
                i += 1
                continue
            loaded, n, j = set(), 0, i
            while j < len(ins):
                op, _, rest = re.sub(r"^@!?P\\w+ ", "", ins[j]).partition(" ")
                ops = rest.split(",")
                srcs = ops if op.startswith(("ST", "BRA")) else ops[1:]
                if op.startswith(("BRA", "EXIT", "BAR", "RET", "CALL")) or \\
                        set(re.findall(r"\\bR(\\d+)", ",".join(srcs))) & loaded:
                    break
                if op == "LDG.E.128":
                    d = int(re.match(r"\\s*R(\\d+)", ops[0]).group(1))
                    loaded |= {str(d + q) for q in range(4)}
                    n += 1
                j += 1
            runs.append((ins[i].startswith("@"), n))
            i = max(j, i + 1)
        return runs

    out = {}
    def record(name, fn, sig, consts):
        ins, regs, stack = sass(fn, sig, consts)
        runs = in_flight(ins)
        out[name] = {"regs": regs, "stack": stack,
                     "full": max([n for p, n in runs if not p], default=0),
                     "tail": sum(n for p, n in runs if p)}

    tdt = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
           torch.float32: tl.float32, torch.float64: tl.float64}
    part = {"table": "*i64", "n_tensors": "i32", "chunk_lo": "i32", "partials": "*fp64",
            "p_bits": "i64"}
    sc = {"table": "*i64", "n_tensors": "i32", "chunk_lo": "i32", "chunk_hi": "i32",
          "coef_ptr": "*fp64"}
    cl = {**{k: sc[k] for k in ("table", "n_tensors", "chunk_lo")}, "bound_bits": "i64",
          "neg_bound_bits": "i64"}
    for dt, kind in json.loads(sys.argv[1]):
        dt = getattr(torch, dt)
        tile = {"DT": tdt[dt], "ALIGNED": True, "CHUNK": CHUNK, "BLOCK": v.block(dt),
                "VEC": v.vec(dt), "DEPTH": v.depth}
        if kind == "scale":
            record(f"scale {dt}", scale.scale, sc, {**tile, "PER_TENSOR": False})
        elif kind == "clamp":
            record(f"clamp {dt}", scale.clamp, cl, {**tile, "CUDA_RULE": True})
        else:
            record(f"pass1 {dt} p={kind}", norm.chunk_partials, part,
                   {**tile, "KIND": pair.norm_kind(kind),
                    "PLAIN": kind != float("inf") and dt != torch.float64})
    print(json.dumps(out))
""")

# What the default variant compiles to on sm_90 (docs/performance.md): every thread keeps four
# 16-byte loads in flight in a full tile (one, for 16-bit pass 1, before issue 25), the masked
# last tiles still load 16-byte vectors, and few enough registers for 4 programs of 8 warps per SM.
_SASS_CASES = [("bfloat16", 2.0), ("float16", 1.0), ("float32", 2.0), ("bfloat16", "inf"),
               ("float64", "inf"), ("bfloat16", "scale"), ("float32", "clamp")]


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_streaming_kernels_keep_loads_in_flight_on_sm90():
    """The sm_90 SASS of the streaming kernels (pass 1 for p = 1, 2, inf, pass 2, clamp), read with
    the Triton wheel's cuobjdump: back-to-back 16-byte loads before their first use, the masked
    tail's 16-byte loads, registers and stack, so a regression in scheduling fails here."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump")):
        pytest.skip("this Triton wheel ships no cuobjdump")
    cases = [(dt, float(k) if k == "inf" else k) for dt, k in _SASS_CASES]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SASS_SCRIPT, json.dumps(cases)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.splitlines()[-1])
    assert len(facts) == len(cases)
    for name, f in facts.items():
        assert f["full"] >= 4, (name, f)  # 4 x 16 B per thread in flight
        assert f["tail"] >= 4, (name, f)  # the masked rows are still 16-byte loads
        assert f["regs"] <= 64 and f["stack"] == 0, (name, f)  # 4 programs per SM, no spills


def _disassembled_functions(path: str) -> dict[str, list[str]]:
    """objdump's disassembly of a shared library: every copy of each (demangled) function's
    instructions, by name (one list entry per copy, as one string)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], check=True,
                          capture_output=True, text=True).stdout
    functions: dict[str, list[str]] = {}
    name, body = None, []
    for line in text.splitlines() + [""]:
        if line.endswith(">:") and "<" in line:
            name, body = line[line.index("<") + 1:-2], []
        elif not line.strip() and name is not None:
            functions.setdefault(name, []).append("\n".join(body))
            name = None
        elif name is not None:
            body.append(line)
    return functions


def _copies(functions: dict[str, list[str]], fragment: str) -> list[str]:
    return [body for name, bodies in functions.items() if fragment in name for body in bodies]


@needs_extension
def test_cuda_pass1_variant_is_chosen_by_name_and_bad_names_are_refused():
    """FUSEDCLIP_CUDA_PASS1 (csrc/engine/tuning.h) is parsed in every build, GPU or not: a known
    name is taken, an unknown one is a ValueError that lists the choices, at first use (not a
    silent fallback to the default)."""
    module = _lib.module()
    assert module.CUDA_PASS1_VARIANTS[0] == "t512u4"
    assert len(set(module.CUDA_PASS1_VARIANTS)) == len(module.CUDA_PASS1_VARIANTS) >= 2
    script = textwrap.dedent("""
        import sys
        from fusedclip.backends.cpp import _lib
        C = _lib.module()
        try:
            print("variant", C.cuda_pass1_variant())
        except ValueError as e:
            print("refused", e)
        try:
            C.set_cuda_pass1_variant("t512u3")
        except ValueError as e:
            print("set refused", e)
        C.set_cuda_pass1_variant(C.CUDA_PASS1_VARIANTS[-1])
        print("now", C.cuda_pass1_variant())
    """)

    def run(value):
        env = {**os.environ, "FUSEDCLIP_CUDA_PASS1": value}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    last = module.CUDA_PASS1_VARIANTS[-1]
    assert "variant t512u4" in run("")
    out = run(last)
    assert f"variant {last}" in out and f"now {last}" in out
    out = run("t512u9")
    row = next(line for line in (Path(__file__).parents[2] / "docs" / "errors.md").read_text()
               .splitlines() if line.startswith("| `cuda-pass1-variant` |"))
    documented = row.split(" | ")[-1].strip(" |`")  # docs/errors.md's message, exactly
    assert f"refused {documented}" in out
    assert ", ".join(module.CUDA_PASS1_VARIANTS) in out
    assert "set refused fusedclip: no CUDA pass-1 variant named 't512u3'" in out
    assert f"now {last}" in out  # a valid choice replaces the bad environment value


def _norm_kernels_sass():
    """cuobjdump's SASS of fusedclip._C's pass-1 kernels, by (dtype, p kind, threads, unroll)."""
    import sass

    tool = sass.find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME/bin, triton/backends/nvidia/bin): the "
                    "pass-1 SASS is not checked")
    dtypes = {"N3c108BFloat16E": "bf16", "N3c104HalfE": "fp16", "f": "fp32", "d": "fp64"}
    pattern = re.compile(r"norm_kernelI(N3c108BFloat16E|N3c104HalfE|f|d)LNS_8NormKindE(\d)E"
                         r"Li(\d+)ELi(\d+)E")
    out = {}
    for name, lines in sass.kernels(_lib.module().__file__, tool).items():
        m = pattern.search(name)
        if m:
            key = (dtypes[m.group(1)], int(m.group(2)), int(m.group(3)), int(m.group(4)))
            out[key] = sass.loads_in_flight(lines)
    return out


@needs_extension
@pytest.mark.skipif(not _lib.loaded() or not _lib.cuda_kernels(),
                    reason="fusedclip._C was built without its CUDA kernels")
def test_pass1_keeps_its_16_byte_loads_in_flight():
    """Pass 1 is a read of every byte: each thread must issue its variant's unroll of 16-byte loads
    back to back before it uses the first. The count, not just the presence: with every load
    predicated nvcc sank each fp32 load to its use (one 16-byte load in flight per thread; runs of
    1 in the p = 2 kernel). p = 1 and 2 (NormKind 0, 1) on bf16, fp16 and fp32, every variant."""
    runs = _norm_kernels_sass()
    for dtype in ("bf16", "fp16", "fp32"):
        for kind in (0, 1):
            assert (dtype, kind, 512, 4) in runs, sorted(runs)
    checked = 0
    for (dtype, kind, threads, unroll), found in sorted(runs.items()):
        if dtype == "fp64" or kind > 1:
            continue
        checked += 1
        if unroll == 4:
            # The unpredicated main loop issues all 4 loads before the first use, and no 16-byte
            # load waits alone (nvcc keeps the predicated remainder's 4 together too).
            assert min(found, default=0) >= 4, (dtype, kind, threads, unroll, found)
        else:
            # Deeper variants: more in flight than the default (under the 64-register cap ptxas
            # keeps 7 of fp32's 8).
            assert max(found, default=0) > 4, (dtype, kind, threads, unroll, found)
    assert checked >= 6


@needs_extension
@pytest.mark.skipif(os.uname().machine != "x86_64" or not shutil.which("objdump"),
                    reason="reads x86-64 code with binutils' objdump")
def test_cpu_loops_are_built_for_three_instruction_sets():
    """What the compiler emitted for the CPU engine's chunk loops (csrc/cpu/chunk_loops.h): one copy
    each for AVX-512 (64-byte zmm fp64 arithmetic), AVX2 (32-byte ymm, no zmm) and the baseline
    (neither: it must run on any x86-64 CPU); the fp16 loads of the two wide sets convert with
    F16C's instruction, and FMA contraction is off everywhere (so the sets agree bit for bit)."""
    functions = _disassembled_functions(_lib.module().__file__)
    sums = _copies(functions, "plain_sum<true, float>")
    assert len(sums) == 3, sorted(n for n in functions if "plain_sum" in n)
    widths = sorted(("zmm" if "%zmm" in b else "ymm" if "%ymm" in b else "xmm") for b in sums)
    assert widths == ["xmm", "ymm", "zmm"]
    for body in sums:
        assert "mulpd" in body and "fmadd" not in body
    fp16 = _copies(functions, "plain_sum<true, fusedclip::cpu::(anonymous namespace)::F16>")
    assert sorted("vcvtph2ps" in b for b in fp16) == [False, True, True]
