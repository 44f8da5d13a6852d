"""``torch.compile``: fusedclip's functions trace into one graph (no graph break inside
fusedclip) on every CPU backend, and compiled calls give the eager results. A CUDA test captures
a whole training step, clip included, in a CUDA graph.

The fused backends are custom operators with fake implementations, so Dynamo keeps them as
single nodes; the reference backend traces as ordinary torch code.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import clone_params, make_params

import fusedclip

SHAPES = [(33, 17), (4099,), (5,), (1,), (0,), (64, 3, 3)]

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
}


def _grads_match(params, twin):
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(CALLS))
def test_no_graph_break_and_eager_results(cpu_backend, name):
    call = CALLS[name]
    explained = torch._dynamo.explain(call)(make_params(SHAPES, seed=1), cpu_backend)
    assert explained.graph_break_count == 0, explained.break_reasons

    torch._dynamo.reset()
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    for seed in (2, 3):  # the second call reuses the compiled graph
        params = make_params(SHAPES, seed=seed)
        twin = clone_params(params)
        got = compiled(params, cpu_backend)
        expected = call(twin, cpu_backend)
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        _grads_match(params, twin)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def test_training_step_has_no_break_inside_fusedclip(cpu_backend):
    """A whole step (forward, backward, clip, SGD step): Dynamo breaks the graph at
    ``backward()`` as it does for any step, but never inside fusedclip; the compiled steps train
    as the eager ones do."""
    models = [_model(), _model()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]

    def step(model, opt, x):
        loss = model(x).pow(2).sum()
        loss.backward()
        norm = fusedclip.clip_grad_norm_(model.parameters(), 0.05, backend=cpu_backend)
        opt.step()
        opt.zero_grad()
        return norm

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    explained = torch._dynamo.explain(step)(_model(), torch.optim.SGD(_model().parameters()), x)
    for reason in explained.break_reasons:
        assert all("fusedclip" not in frame.filename for frame in reason.user_stack), reason

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")
    for _ in range(3):
        a = compiled(models[0], opts[0], x)
        b = step(models[1], opts[1], x)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_of_a_whole_training_step(backend):
    """Forward, backward, clip and a capturable Adam step captured in one CUDA graph and
    replayed: the same weights as the eager loop (torch's whole-network capture recipe)."""
    torch.manual_seed(0)
    model = _model().cuda()
    twin = _model().cuda()
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
