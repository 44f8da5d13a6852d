"""Gradients spread over the ranks of a process group (``process_group=``), with real processes.

Each test spawns 2 or 4 ranks that talk over gloo on the CPU. Every rank builds the same model
gradients from one seed, keeps its share (a strided split, and with 4 ranks one rank owns nothing)
and clips with ``process_group``; the parent compares every rank's norm and clipped gradients with
the reference run on all gradients in one process. The ranks run every CPU backend: the reference,
the CUDA engine's CPU operators and the Triton kernels in the interpreter.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import clip_rtol, make_params

import fusedclip

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

SHAPES = [(33, 17), (70001,), (5,), (1,), (0,), (64, 3, 3), (257,), (4099,), (9, 9)]
CASES = [(2.0, 0.5), (1.0, 3.0), (math.inf, 0.01), (1.5, 1e6)]  # (norm_type, max_norm)


def _share(params, rank, world):
    """This rank's parameters; with 4 ranks, rank 3 owns none."""
    if world == 4 and rank == 3:
        return []
    owners = world - 1 if world == 4 else world
    return [p for i, p in enumerate(params) if i % owners == rank]


def _enable_cpu_operators():
    """What conftest's cpu_backend fixture does for "cuda-ops-on-cpu", in a spawned rank."""
    from fusedclip import backends

    backends._RUNS_ON["cuda"] = None
    backends._STATUS["cuda"] = lambda: backends.BackendStatus(True, "test: CPU operators")
    backends.backend_status.cache_clear()


def _rank(rank, world, init_file, backend, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        if backend == "cuda-ops-on-cpu":
            _enable_cpu_operators()
            backend = "cuda"
        results = []
        for norm_type, max_norm in CASES:
            params = make_params(SHAPES, seed=3)
            mine = _share(params, rank, world)
            total = fusedclip.get_total_norm([p.grad for p in mine], norm_type, backend=backend,
                                             process_group=dist.group.WORLD)
            norm = fusedclip.clip_grad_norm_(mine, max_norm, norm_type, backend=backend,
                                             process_group=dist.group.WORLD)
            results.append((norm, total, [p.grad for p in mine]))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world, backend):
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_rank, args=(world, init_file, backend, out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_group_norm_matches_unsharded(cpu_backend, world):
    backend = "cuda-ops-on-cpu" if cpu_backend == "cuda" else cpu_backend
    per_rank = _spawn(world, backend)
    for case, (norm_type, max_norm) in enumerate(CASES):
        params = make_params(SHAPES, seed=3)
        before = [p.grad.clone() for p in params]
        expected = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend="reference")
        clipped = float(expected) > max_norm
        for rank in range(world):
            norm, total, grads = per_rank[rank][case]
            torch.testing.assert_close(norm.double(), expected.double(), rtol=1e-5, atol=0)
            torch.testing.assert_close(total.double(), expected.double(), rtol=1e-5, atol=0)
            mine = _share(list(range(len(params))), rank, world)
            assert len(grads) == len(mine)
            for g, i in zip(grads, mine):
                ref = params[i].grad
                torch.testing.assert_close(g, ref, rtol=2 * clip_rtol(g.dtype), atol=0)
                if clipped and g.numel():  # the clip did something on every rank
                    assert not torch.equal(g, before[i])


def test_single_rank_group_is_the_plain_call():
    """A group of one rank, in this process: the same norm as without process_group."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
        try:
            params = make_params(SHAPES, seed=4)
            twin = make_params(SHAPES, seed=4)
            a = fusedclip.clip_grad_norm_(params, 0.5, process_group=dist.group.WORLD)
            b = fusedclip.clip_grad_norm_(twin, 0.5)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
            params[1].grad[3] = math.nan
            c = fusedclip.clip_grad_norm_(params, 0.5, math.inf, process_group=dist.group.WORLD)
            assert math.isnan(float(c))  # NaN survives the MAX reduction
            with pytest.raises(ValueError, match="process_group"):
                fusedclip.clip_grad_norm_(params, 0.5, return_stats=True,
                                          process_group=dist.group.WORLD)
        finally:
            dist.destroy_process_group()
