"""Per-operation micro-benchmarks: each fusedclip backend and torch on the same gradients (see
bench/conftest.py for how to run and compare them)."""

from __future__ import annotations

import time

import pytest
import torch

import fusedclip
from fusedclip.torch_patch import torch_function


def synchronized_timer() -> float:
    """``time.perf_counter`` once the GPU has finished what was queued: device time."""
    torch.cuda.synchronize()
    return time.perf_counter()


DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.benchmark(timer=synchronized_timer)])]
# (name, shapes per device): one large tensor, and many small ones (the per-tensor host cost).
SETS = {
    "large": {"cpu": [(1 << 22,)], "cuda": [(1 << 27,)]},
    "many-small": {"cpu": [(n % 4093 + 1,) for n in range(500)],
                   "cuda": [(n % 16381 + 1,) for n in range(5000)]},
}
IMPLEMENTATIONS = ["torch", "cpp", "triton", "reference"]

# (operation, what fusedclip and torch call): clip with clipping active, without, the norm alone,
# and value clipping.
OPERATIONS = {
    "clip": lambda f, ps, n: f("clip_grad_norm_")(ps, 0.1 * n),
    "noclip": lambda f, ps, n: f("clip_grad_norm_")(ps, 10.0 * n),
    "total_norm": lambda f, ps, n: f("get_total_norm")([p.grad for p in ps]),
    "value": lambda f, ps, n: f("clip_grad_value_")(ps, 0.5),
}


def _functions(implementation: str):
    if implementation == "torch":
        return torch_function
    return lambda name: lambda *args: getattr(fusedclip, name)(*args, backend=implementation)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("set_name", sorted(SETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("device", DEVICES)
def test_operation(timed, device, dtype, set_name, operation, implementation):
    if implementation != "torch":
        status = fusedclip.available_backends()[implementation]
        if not status.runs_on(device) or (implementation == "triton" and device == "cpu"):
            pytest.skip(f"{implementation} does not run {device} tensors here: {status.reason}")
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in SETS[set_name][device]:
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        p.grad = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        params.append(p)
    pristine = [p.grad.clone() for p in params]
    norm = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g, dtype=torch.float64) for g in pristine])))

    def restore():
        torch._foreach_copy_([p.grad for p in params], pristine)

    call = OPERATIONS[operation]
    functions = _functions(implementation)
    timed(lambda: call(functions, params, norm), restore)


# The one-call path's host work per gradient (reading every .grad in C++, checking it, looking up
# the cached plan) against its floor, a bare C++ loop that only reads each .grad's data pointer;
# and the whole one-call pass 1 on top. Tiny CPU gradients, so the passes cost next to nothing.
HOST_CALLS = {
    "floor": lambda c, ps: c.grad_pointer_floor(ps),
    "collect+plan": lambda c, ps: c.plan_of_params(ps, False, False, True),
    "one-call-norm": lambda c, ps: c.norm_params(ps, 1.0, 2.0, False),
}


@pytest.mark.skipif(not fusedclip.available_backends()["cpp"].available,
                    reason="needs fusedclip._C")
@pytest.mark.parametrize("call", list(HOST_CALLS))
def test_host_cost(benchmark, call):
    from fusedclip.backends.cpp import _lib

    params = [torch.nn.Parameter(torch.empty(4)) for _ in range(5000)]
    for p in params:
        p.grad = torch.randn(4)
    module = _lib.module()
    benchmark.extra_info["tensors"] = len(params)
    benchmark(HOST_CALLS[call], module, params)


# A whole training step (forward, backward, clip, fused AdamW step) of a small decoder on each
# clipping variant (fusedclip.tools.bench.train_step): what clipping costs a step, against the
# same step without it ("none").
@pytest.mark.parametrize("variant", ["none", "torch", "fusedclip", "backward"])
@pytest.mark.parametrize("model", ["llama-tiny", "gpt2-tiny"])
def test_train_step(benchmark, model, variant):
    from fusedclip.tools.bench import train_step

    runner = train_step.runner(variant, model, "cpu", max_norm=1e-3)
    batches = iter(train_step.batches(model, "cpu", 200, seed=1))
    benchmark.extra_info["parameters"] = sum(p.numel() for p in runner.model.parameters())
    benchmark.pedantic(lambda: runner.step(next(batches)), rounds=30, iterations=1,
                       warmup_rounds=3)
    runner.close()
