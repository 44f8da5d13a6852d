"""Gradients spread over the ranks of a process group (``process_group=``), with real processes.

Each spawning test starts 2 or 4 ranks that talk over gloo on the CPU. Every rank builds the same
model gradients from one seed, keeps its share (a strided split, and with 4 ranks one rank owns
nothing) and clips with ``process_group``, once with every backend that runs CPU tensors here (the
C++ engine, the Triton kernels in the interpreter, the reference: ``ranks.cpu_backends``); the
parent compares every rank's norm and clipped gradients, for every backend, with the fp64 oracle
on all gradients in one process.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
import torch.distributed as dist
from gradients import make_params
from oracle import assert_norm_close, clip_rtol, oracle_clipped, oracle_norm
from ranks import about, backends_not_run, check_backends_ran, cpu_backends, spawn

import fusedclip
from fusedclip import _select, distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

if dist.is_available():
    from torch.distributed.tensor.debug import CommDebugMode

SHAPES = [(33, 17), (70001,), (5,), (1,), (0,), (64, 3, 3), (257,), (4099,), (9, 9)]
CASES = [(2.0, 0.5), (1.0, 3.0), (math.inf, 0.01), (1.5, 1e6)]  # (norm_type, max_norm)


@pytest.mark.slow
@pytest.mark.parametrize("name", _select.BACKEND_NAMES)
def test_ranks_run_every_cpu_backend(name):
    """What the spawned ranks (here and in test_dtensor.py) do not run here, as a visible skip
    with its reason."""
    reason = backends_not_run().get(name)
    if reason:
        pytest.skip(f"{name} on cpu: not run by the spawned ranks: {reason}")
    assert name in cpu_backends()


def _share(params, rank, world):
    """This rank's parameters; with 4 ranks, rank 3 owns none."""
    if world == 4 and rank == 3:
        return []
    owners = world - 1 if world == 4 else world
    return [p for i, p in enumerate(params) if i % owners == rank]


def _rank(rank, world, backends):
    per_backend = {}
    for backend in backends:
        results = []
        for norm_type, max_norm in CASES:
            params = make_params(SHAPES, seed=3)
            mine = _share(params, rank, world)
            total = fusedclip.get_total_norm([p.grad for p in mine], norm_type, backend=backend,
                                             process_group=dist.group.WORLD)
            with CommDebugMode() as comm:
                norm = fusedclip.clip_grad_norm_(mine, max_norm, norm_type, backend=backend,
                                                 process_group=dist.group.WORLD)
            # One functional all-reduce, as torch's clip issues (by name: the ranks pickle it).
            counts = {str(op): n for op, n in comm.get_comm_counts().items()}
            results.append((norm, total, [p.grad for p in mine], counts))
        per_backend[backend] = results
    return per_backend


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_group_norm_matches_unsharded(world):
    backends = cpu_backends()
    per_rank = spawn(_rank, world, backends)
    check_backends_ran(per_rank, backends)
    for case, (norm_type, max_norm) in enumerate(CASES):
        before = [p.grad for p in make_params(SHAPES, seed=3)]
        exact = oracle_norm(before, norm_type)
        clipped = exact > max_norm
        for backend in backends:
            for rank in range(world):
                norm, total, grads, counts = per_rank[rank][backend][case]
                with about(f"backend {backend}, rank {rank}, norm_type={norm_type}"):
                    assert counts == {"c10d_functional.all_reduce": 1}, counts
                    assert norm.dtype == torch.float32 and norm.shape == ()
                    assert_norm_close(norm, exact)
                    assert_norm_close(total, exact)
                    mine = _share(list(range(len(before))), rank, world)
                    assert len(grads) == len(mine)
                    for g, i in zip(grads, mine):
                        expected = oracle_clipped(before[i], max_norm, exact)
                        torch.testing.assert_close(g, expected, rtol=clip_rtol(g.dtype), atol=0)
                        if clipped and g.numel():  # the clip did something on every rank
                            assert not torch.equal(g, before[i])


def test_single_rank_group_is_the_plain_call():
    """A group of one rank, in this process: the same norm as without process_group, with the
    automatic choice and with every backend that runs CPU tensors here."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
        try:
            for backend in (None, *cpu_backends()):
                with about(f"backend {backend}"):
                    params = make_params(SHAPES, seed=4)
                    twin = make_params(SHAPES, seed=4)
                    a = fusedclip.clip_grad_norm_(params, 0.5, backend=backend,
                                                  process_group=dist.group.WORLD)
                    b = fusedclip.clip_grad_norm_(twin, 0.5, backend=backend)
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
                    params[1].grad[3] = math.nan
                    c = fusedclip.clip_grad_norm_(params, 0.5, math.inf, backend=backend,
                                                  process_group=dist.group.WORLD)
                    assert math.isnan(float(c))  # NaN survives the MAX reduction
                    with pytest.raises(ValueError, match="process_group"):
                        fusedclip.clip_grad_norm_(params, 0.5, return_stats=True,
                                                  backend=backend, process_group=dist.group.WORLD)
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize(
    ("config", "accelerator", "expected"),
    [
        ("cpu:gloo,cuda:nccl", "cuda", "cuda"),  # CPU offload as well: one backend for all ranks
        ("cpu:gloo,cuda:nccl", None, "cpu"),
        ("cuda:nccl", "cuda", "cuda"),  # init_process_group()'s default on a GPU (torch 2.14)
        ("nccl", "cuda", "cuda"),
        ("cpu:gloo,xpu:xccl,cuda:nccl", "cuda", "cuda"),  # this machine's accelerator, not xpu
        ("cpu:gloo,cuda:gloo", "cuda", "cpu"),  # gloo blocks anyway: no device round trip
        ("gloo", "cuda", "cpu"),
        ("cpu:gloo", None, "cpu"),
        ("cpu:fake,cuda:fake", None, "cpu"),  # names CUDA on a machine without one
    ],
)
def test_buffer_device_type(config, accelerator, expected):
    """The all-reduce buffer goes where the group reduces without a host sync, decided from the
    group and the machine only, so that a rank without gradients decides alike."""
    backends = distributed.backend_map(config)
    assert distributed.buffer_device_type(backends, accelerator, config) == expected


def test_buffer_device_type_without_a_usable_backend():
    with pytest.raises(RuntimeError, match="serve neither the CPU nor"):
        distributed.buffer_device_type(distributed.backend_map("cuda:nccl"), None, "cuda:nccl")


def test_default_configuration_single_rank():
    """``init_process_group()`` with no backend (on a CPU machine "cpu:gloo"): the buffer on
    the CPU."""
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group(init_method=f"file://{d}/init", rank=0, world_size=1)
        try:
            assert distributed.group_device(None, torch.device("cpu")) == torch.device("cpu")
            assert distributed.group_device(None, None) == torch.device("cpu")
            params = make_params(SHAPES, seed=4)
            twin = make_params(SHAPES, seed=4)
            a = fusedclip.clip_grad_norm_(params, 0.5, process_group=dist.group.WORLD)
            torch.testing.assert_close(a, fusedclip.clip_grad_norm_(twin, 0.5), rtol=1e-12,
                                       atol=0)
        finally:
            dist.destroy_process_group()


@pytest.fixture(params=["nccl", "cpu:gloo,cuda:nccl"], ids=["nccl", "gloo-and-nccl"])
def nccl_group(request):
    """A one-rank group with NCCL for CUDA in this process (the device has one GPU)."""
    if not dist.is_nccl_available():
        pytest.skip("needs NCCL")
    with tempfile.TemporaryDirectory() as d:
        torch.cuda.set_device(0)
        # "cpu:gloo,cuda:nccl" (as set for CPU offload): CUDA buffers must still go to NCCL.
        dist.init_process_group(request.param, init_method=f"file://{d}/init", rank=0,
                                world_size=1, device_id=torch.device("cuda", 0))
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_nccl_single_rank_capture(nccl_group, backend):
    """NCCL on the device: the same norm as the plain call, no host sync, and the whole clip,
    all-reduce included, captured in a CUDA graph and replayed."""
    status = fusedclip.available_backends()[backend]
    if not status.runs_on("cuda"):
        pytest.skip(f"{backend} on cuda: {status.reason}")
    shapes = [(70000,), (3, 5), (0,), (300, 7)] + [(n % 50,) for n in range(200)]
    params = make_params(shapes, device="cuda", seed=5)
    twin = make_params(shapes, device="cuda", seed=5)
    expected = fusedclip.clip_grad_norm_(twin, 0.5, backend=backend)
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = fusedclip.clip_grad_norm_(params, 0.5, backend=backend, process_group=nccl_group)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(norm, expected, rtol=1e-12, atol=0)
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)

    pristine = [p.grad.clone() for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = fusedclip.clip_grad_norm_(params, 0.5, backend=backend,
                                             process_group=nccl_group)
    for scale in (1.0, 1e-3):  # clipping active, then nothing to clip
        for p, q, g in zip(params, twin, pristine):
            p.grad.copy_(g * scale)
            q.grad.copy_(g * scale)
        graph.replay()
        expected = fusedclip.clip_grad_norm_(twin, 0.5, backend=backend)
        torch.testing.assert_close(captured, expected, rtol=1e-12, atol=0)
        for p, q in zip(params, twin):
            torch.testing.assert_close(p.grad, q.grad, rtol=2 * clip_rtol(p.grad.dtype), atol=0)


@pytest.mark.gpu
def test_nccl_dtensor_single_rank(nccl_group):
    """DTensor gradients on a one-rank CUDA mesh: the plain call's norm, as a replicated DTensor,
    with no host sync."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("dp",))
    plain = make_params([(33, 17), (4099,), (1,)], device="cuda", seed=6)
    sharded = []
    for p in plain:
        q = torch.nn.Parameter(DTensor.from_local(p.detach().clone(), mesh, [Shard(0)]))
        q.grad = DTensor.from_local(p.grad.clone(), mesh, [Shard(0)])
        sharded.append(q)
    expected = fusedclip.clip_grad_norm_(plain, 0.5)
    torch.cuda.set_sync_debug_mode("error")  # the mesh's all-reduce stays on the stream
    try:
        norm = fusedclip.clip_grad_norm_(sharded, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert isinstance(norm, DTensor) and norm.placements[0].is_replicate()
    torch.testing.assert_close(norm.to_local(), expected, rtol=1e-12, atol=0)
    for p, q in zip(plain, sharded):
        torch.testing.assert_close(q.grad.to_local(), p.grad, rtol=0, atol=0)
