"""``torch.compile``: fusedclip's functions and ``AutoClipper.step`` trace into one graph (no graph
break inside fusedclip, ``fullgraph=True``) for every backend on every device of the conftest
matrix, and compiled calls give the eager results. A CUDA test captures a whole training step,
clip included, in a CUDA graph.

The fused backends are custom operators with fake implementations, so Dynamo keeps them as
single nodes; the reference backend traces as ordinary torch code. For the fused backends the
compiled and the eager call run the same operators, so these tests check the plumbing around them
(the operators' numerics are the oracle's business: tests/api, tests/engine).
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
from gradients import clone_params, grads, make_params
from torch._dynamo.testing import CompileCounterWithBackend

import fusedclip
import fusedclip.backends.reference

SHAPES = [(33, 17), (4099,), (5,), (1,), (0,), (64, 3, 3)]


def _with_data(params, seed):
    """Parameters with random values (adaptive clipping reads them), gradients as they are."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)
    return params


# name -> call(params, backend); each returns a tensor (or None) and may modify the gradients.
CALLS = {
    "norm-2": lambda ps, b: fusedclip.clip_grad_norm_(ps, 0.5, backend=b),
    "norm-inf": lambda ps, b: fusedclip.clip_grad_norm_(ps, 0.01, math.inf, backend=b),
    "soft": lambda ps, b: fusedclip.clip_grad_norm_(ps, 0.5, mode="soft", backend=b),
    "stats": lambda ps, b: fusedclip.clip_grad_norm_(ps, 0.5, return_stats=True,
                                                     backend=b).clip_coef,
    "total-norm": lambda ps, b: fusedclip.get_total_norm([p.grad for p in ps], 1.5, backend=b),
    "with-norm": lambda ps, b: fusedclip.clip_grads_with_norm_(ps, 0.5, torch.tensor(7.0),
                                                               backend=b),
    "value": lambda ps, b: fusedclip.clip_grad_value_(ps, 0.01, backend=b),
    "per-tensor": lambda ps, b: fusedclip.clip_grad_norm_per_tensor_(ps, 0.5, backend=b),
    # (The first four: every row is a program of Triton's interpreter.)
    "adaptive": lambda ps, b: fusedclip.adaptive_clip_grad_(ps[:4], 0.01, 1e-3, backend=b),
}


def _grads_match(params, twin):
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(CALLS))
def test_no_graph_break_and_eager_results(backend, device, name):
    call = CALLS[name]
    explained = torch._dynamo.explain(call)(_with_data(make_params(SHAPES, device=device, seed=1),
                                                       1), backend)
    assert explained.graph_break_count == 0, explained.break_reasons

    torch._dynamo.reset()
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    for seed in (2, 3):  # the second call reuses the compiled graph
        params = _with_data(make_params(SHAPES, device=device, seed=seed), seed)
        twin = clone_params(params)
        before = [g.clone() for g in grads(params)]
        got = compiled(params, backend)
        expected = call(twin, backend)
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        _grads_match(params, twin)
        if name not in ("total-norm", "with-norm"):  # (7.0 is under the norm: nothing to clip)
            assert any(not torch.equal(g, b) for g, b in zip(grads(params), before))


@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_auto_clipper_step_compiles_and_matches_eager(backend, device, method):
    """``AutoClipper.step`` under ``fullgraph=True`` through warmup, spikes and an inf step: the
    same norms, thresholds and gradients as an eager clipper. The host step count is guarded on
    while it decides the branches (warmup), then traced as a symbolic int: the graphs stop
    multiplying once the warmup and the window are behind."""
    scales = [1.0 + 0.05 * math.sin(i) for i in range(16)]
    scales[9], scales[11], scales[13] = 20.0, math.inf, 50.0
    params = make_params([(50,), (7, 3)], device=device, seed=7)
    twin = clone_params(params)
    base = [p.grad.clone() for p in params]
    eager = fusedclip.AutoClipper(twin, method, warmup_steps=3, window=4, backend=backend)
    explained = torch._dynamo.explain(
        fusedclip.AutoClipper(clone_params(params), method, warmup_steps=3, window=4,
                              backend=backend).step)()
    assert explained.graph_break_count == 0, explained.break_reasons

    torch._dynamo.reset()
    clipper = fusedclip.AutoClipper(params, method, warmup_steps=3, window=4, backend=backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(clipper.step, backend=counter, fullgraph=True)
    frames, thresholds, norms = [], [], []
    for s in scales:
        for p, q, b in zip(params, twin, base):
            p.grad, q.grad = b * s, b * s
        got = compiled()
        expected = eager.step()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0, equal_nan=True)
        torch.testing.assert_close(clipper.threshold, eager.threshold, rtol=1e-12, atol=0)
        for p, q in zip(params, twin):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0, equal_nan=True)
        frames.append(counter.frame_count)
        thresholds.append(float(clipper.threshold))
        norms.append(float(got))
    assert clipper.steps == eager.steps == len(scales)
    assert thresholds[13] < norms[13]  # the last spike was clipped
    assert frames[-1] == frames[8], frames  # no new graph after the warmup and the first window


_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.realpath(fusedclip.__file__)), "")
# The Triton kernels install inside the package but live at a checkout's top level
# (triton_kernels/).
_KERNEL_PATHS = importlib.import_module("fusedclip.triton_kernels").__path__
_PACKAGE_DIRS = (_PACKAGE_DIR, *(os.path.join(os.path.realpath(d), "") for d in _KERNEL_PATHS))


def _inside_fusedclip(filename: str) -> bool:
    """Whether a frame's file is part of the fusedclip package under test: decided by the
    package's real locations, not by a name in the path (a checkout is often named fusedclip)."""
    return os.path.realpath(filename).startswith(_PACKAGE_DIRS)


def test_inside_fusedclip_is_the_package_not_the_checkout():
    assert _inside_fusedclip(fusedclip.api.__file__)
    assert _inside_fusedclip(fusedclip.backends.reference.__file__)
    kernels = importlib.import_module("fusedclip.triton_kernels").__path__[0]
    assert _inside_fusedclip(os.path.join(kernels, "norm.py"))
    assert not _inside_fusedclip(__file__)  # tests/ sits beside the package, in any checkout
    assert not _inside_fusedclip(os.path.join(os.path.dirname(_PACKAGE_DIR) + "-other", "x.py"))


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 3)).to(device)


def test_training_step_has_no_break_inside_fusedclip(backend, device):
    """A whole step (forward, backward, clip, SGD step): Dynamo breaks the graph at
    ``backward()`` as it does for any step, but never inside fusedclip; the compiled steps train
    as the eager ones do."""
    models = [_model(device), _model(device)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]

    def step(model, opt, x):
        loss = model(x).pow(2).sum()
        loss.backward()
        norm = fusedclip.clip_grad_norm_(model.parameters(), 0.05, backend=backend)
        opt.step()
        opt.zero_grad()
        return norm

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4)).to(device)
    explained = torch._dynamo.explain(step)(_model(device),
                                            torch.optim.SGD(_model(device).parameters()), x)
    for reason in explained.break_reasons:
        assert not any(_inside_fusedclip(frame.filename) for frame in reason.user_stack), reason

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    for _ in range(3):
        a = compiled(models[0], opts[0], x)
        b = step(models[1], opts[1], x)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_graph_of_a_whole_training_step(backend):
    """Forward, backward, clip and a capturable Adam step captured in one CUDA graph and
    replayed: the same weights as the eager loop (torch's whole-network capture recipe)."""
    status = fusedclip.available_backends()[backend]
    if not status.runs_on("cuda"):
        pytest.skip(f"backend {backend} cannot run CUDA tensors here: {status.reason}")
    model = _model("cuda")
    twin = _model("cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2, capturable=True)
    gen = torch.Generator(device="cuda").manual_seed(5)
    batches = [torch.randn(16, 8, device="cuda", generator=gen) for _ in range(6)]
    static_x = batches[0].clone()

    def step(m, o, x):
        o.zero_grad(set_to_none=True)
        m(x).pow(2).sum().backward()
        norm = fusedclip.clip_grad_norm_(m.parameters(), 0.05, backend=backend)
        o.step()
        return norm

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up iterations on a side stream, as capture requires
        for x in batches[:3]:
            step(model, opt, x)
            step(twin, twin_opt, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_norm = step(model, opt, static_x)
    for x in batches[3:]:
        static_x.copy_(x)
        graph.replay()
        norm = step(twin, twin_opt, x)
        torch.testing.assert_close(static_norm, norm, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
