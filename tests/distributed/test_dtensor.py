"""DTensor gradients: FSDP2 (``fully_shard``) on a 1-D mesh, and tensor parallel layers sharded
again by FSDP2 on a 2-D ``(dp, tp)`` mesh, with real processes over gloo on the CPU.

Every rank builds the same model from one seed, runs a backward pass on its own batch, gathers the
full gradients (``full_tensor``) for the fp64 oracle, and then clips its DTensor gradients with
fusedclip, with every backend that runs CPU tensors here in turn (``ranks.cpu_backends``: one spawn
per test for all of them). The norm must match the oracle on every rank, come back as torch returns
it (a DTensor replicated over the mesh), and cost one all-reduce per mesh dimension that shards a
gradient; every local shard must be its start scaled by the oracle's coefficient.
Where torch's own clip accepts the model (one mesh for all gradients) it is run too, and both
agree. The 2-D model has a LayerNorm on the ``dp`` sub-mesh beside the tensor-parallel layers on
the full mesh, which torch's clip refuses (operands on different meshes).

FSDP2 with ``CPUOffloadPolicy`` reduces the gradients into host memory: DTensors whose local shards
are CPU tensors, which auto clips with the compiled engine's CPU kernels (``cpp``), as it clips
plain CPU tensors, and every backend agrees there with the oracle and with torch's own clip. (On
gloo the mesh is the CPU's, so the shards would be in host memory without the policy too: these
ranks run the policy's code path, not a device-to-host copy.)
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from oracle import clip_rtol, oracle_coef, oracle_norm
from ranks import about, check_backends_ran, cpu_backends, spawn
from torch import nn

import fusedclip
from fusedclip.backends.cpp import _lib

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

if dist.is_available():
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed.tensor.debug import CommDebugMode

CASES = [(2.0, 0.05), (1.0, 1.0), (math.inf, 0.01), (3.0, 1e6)]  # (norm_type, max_norm)


@contextlib.contextmanager
def _counting_all_reduces():
    """The groups of the all-reduces issued inside the block, in order. They must be functional
    collectives, as torch's own clip issues them: ``CommDebugMode`` (what PyTorch's FSDP2 clip test
    counts with) must see exactly as many ``c10d_functional.all_reduce`` and no ``allreduce_``."""
    calls = []
    original = funcol.all_reduce

    def counted(tensor, reduce_op, group, *args, **kwargs):
        calls.append(group)
        return original(tensor, reduce_op, group, *args, **kwargs)

    funcol.all_reduce = counted
    try:
        with CommDebugMode() as comm:
            yield calls
    finally:
        funcol.all_reduce = original
    counts = comm.get_comm_counts()
    assert counts.get(torch.ops.c10d_functional.all_reduce, 0) == len(calls), counts
    assert counts.get(torch.ops.c10d.allreduce_, 0) == 0, counts


def _fsdp_model(mesh, dtype, outputs=1, **policies):
    """Linear layers with uneven shards: 13 rows over 2 ranks, and ``outputs`` rows (1: one rank
    empty); ``policies`` go to every ``fully_shard`` (``offload_policy=``)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 13), nn.ReLU(), nn.Linear(13, outputs)).to(dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **policies)
    return fully_shard(model, mesh=mesh, **policies)


def _tp_model(mesh, norm_layer):
    """Colwise and rowwise tensor-parallel layers on ``tp``, all sharded by FSDP2 on ``dp``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6)]
    model = nn.Sequential(*layers, *([nn.LayerNorm(6)] if norm_layer else []))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return fully_shard(model, mesh=mesh["dp"])


def _backward(model, dp_rank, dtype):
    torch.manual_seed(100 + dp_rank)  # ranks of one tensor-parallel group share their batch
    x = torch.randn(5, 8, dtype=dtype)
    (model(x).float().pow(2).sum() * 3).backward()


def _check_clip(params, backend, reductions, mesh, compare_torch, orders=None):
    """Clips ``params``' DTensor gradients with every case; asserts against the oracle and
    (``compare_torch``) torch; returns the norms, and leaves the gradients as it found them.
    ``orders`` collects the names of the groups reduced over, in order, for every case."""
    from torch.distributed.tensor import DTensor

    start = [p.grad.to_local().clone() for p in params]
    full = [p.grad.full_tensor() for p in params]  # a collective: before the counting starts
    dtype = start[0].dtype
    # torch's inf-norm refuses an empty local shard (_foreach_norm has no identity for max):
    # whether any rank holds one, agreed by all so that they all call torch's clip or none does.
    empty = torch.tensor(float(any(g.numel() == 0 for g in start)))
    dist.all_reduce(empty, op=dist.ReduceOp.MAX)
    norms = []
    for norm_type, max_norm in CASES:
        expected = oracle_norm(full, norm_type)
        coef = oracle_coef(max_norm, expected)
        with _counting_all_reduces() as calls:
            norm = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend)
        assert len(calls) == reductions, calls
        if orders is not None:
            orders.append([group.group_name for group in calls])
        assert isinstance(norm, DTensor) and norm.device_mesh == mesh
        assert all(pl.is_replicate() for pl in norm.placements)
        assert norm.dtype == torch.promote_types(dtype, torch.float32)
        # The norm in the gradients' dtype promoted with float32: the 1e-5 contract (was 1e-2).
        torch.testing.assert_close(norm.to_local().double(), torch.tensor(expected).double(),
                                   rtol=1e-5, atol=0)
        for p, g in zip(params, start):
            mine = p.grad.to_local()
            torch.testing.assert_close(mine.double(), g.double() * coef,
                                       rtol=2 * clip_rtol(dtype), atol=0)
        for p, g in zip(params, start):
            p.grad.to_local().copy_(g)
        total = fusedclip.get_total_norm([p.grad for p in params], norm_type, backend=backend)
        assert isinstance(total, DTensor)
        torch.testing.assert_close(total.to_local(), norm.to_local(), rtol=0, atol=0)
        if compare_torch and not (math.isinf(norm_type) and empty.item()):
            with CommDebugMode() as comm:
                theirs = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            # torch's clip reduces with functional all-reduces too, as many as fusedclip's.
            counts = comm.get_comm_counts()
            assert counts.get(torch.ops.c10d_functional.all_reduce, 0) == reductions, counts
            torch.testing.assert_close(norm.full_tensor(), theirs.full_tensor(), rtol=1e-5,
                                       atol=0)
            for p, g in zip(params, start):
                torch.testing.assert_close(p.grad.to_local().double(), g.double() * coef,
                                           rtol=2 * clip_rtol(dtype), atol=0)
                p.grad.to_local().copy_(g)
        norms.append(float(norm.to_local()))
    return norms


def _check_refusals(params, mesh, backend):
    """Unsupported combinations raise before any gradient is touched, whatever the backend."""
    from torch.distributed.tensor import DTensor, Partial

    before = [p.grad.to_local().clone() for p in params]
    with pytest.raises(ValueError, match="DTensor gradients"):
        fusedclip.clip_grad_norm_(params, 0.1, return_stats=True, backend=backend)
    with pytest.raises(ValueError, match="DTensor gradients"):
        fusedclip.clip_grad_norm_(params, 0.1, scaler=torch.amp.GradScaler("cpu"),
                                  optimizer=torch.optim.SGD(params, lr=0.1), backend=backend)
    with pytest.raises(TypeError, match="DTensor"):
        fusedclip.clip_grad_norm_per_tensor_(params, 0.1, backend=backend)
    with pytest.raises(TypeError, match="DTensor"):
        fusedclip.adaptive_clip_grad_(params, backend=backend)
    with pytest.raises(TypeError, match="AutoClipper does not take DTensor"):
        fusedclip.AutoClipper(params, backend=backend).step()
    plain = torch.nn.Parameter(torch.ones(3))
    plain.grad = torch.full((3,), 2.0)
    with pytest.raises(ValueError, match="mix DTensors and plain tensors"):
        fusedclip.clip_grad_norm_([*params, plain], 0.1, backend=backend)
    with pytest.raises(ValueError, match="mix DTensors and plain tensors"):
        fusedclip.get_total_norm([params[0].grad, plain.grad], backend=backend)
    with pytest.raises(ValueError, match="shares ranks"):  # the mesh's own ranks: counted twice
        fusedclip.clip_grad_norm_(params, 0.1, process_group=mesh.get_group(0), backend=backend)
    assert torch.equal(plain.grad, torch.full((3,), 2.0))
    partial = DTensor.from_local(torch.randn(4), mesh, [Partial()])
    with pytest.raises(ValueError, match="Partial placement"):
        fusedclip.get_total_norm([params[0].grad, partial], backend=backend)
    for p, g in zip(params, before):
        assert torch.equal(p.grad.to_local(), g)


def _check_value_clip(params, backend):
    """Value clipping works on the local shards: bitwise torch's DTensor clip."""
    start = [p.grad.to_local().clone() for p in params]
    torch.nn.utils.clip_grad_value_(params, 0.01)
    theirs = [p.grad.to_local().clone() for p in params]
    for p, g in zip(params, start):
        p.grad.to_local().copy_(g)
    fusedclip.clip_grad_value_(params, 0.01, backend=backend)
    assert all(torch.equal(p.grad.to_local(), t) for p, t in zip(params, theirs))
    assert any(not torch.equal(t, g) for t, g in zip(theirs, start))  # the bound clamps some
    for p, g in zip(params, start):
        p.grad.to_local().copy_(g)


def _fsdp_rank(rank, world, backends):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    results = {backend: [] for backend in backends}
    for dtype in (torch.float32, torch.bfloat16):
        model = _fsdp_model(mesh, dtype)
        _backward(model, rank, dtype)
        params = list(model.parameters())
        for backend in backends:
            with about(f"backend {backend}, rank {rank}, {dtype}"):
                results[backend].append(
                    _check_clip(params, backend, 1, mesh, dtype == torch.float32))
    for backend in (None, *backends):  # the refusals come first, with auto too
        with about(f"backend {backend}, rank {rank}"):
            _check_refusals(params, mesh, backend)
            if backend is not None:
                _check_value_clip(params, backend)
    return results


def _mesh_2d_rank(rank, world, backends):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    results = {backend: [] for backend in backends}
    for norm_layer in (False, True):
        model = _tp_model(mesh, norm_layer)
        _backward(model, mesh.get_coordinate()[0], torch.float32)
        params = list(model.parameters())
        placements = {p.grad.placements for p in params}
        assert any(all(not pl.is_replicate() for pl in pls) for pls in placements)  # (dp, tp)
        assert any(pls[-1].is_replicate() for pls in placements if len(pls) == 2)  # replicated
        # Two all-reduces (dp, tp) whatever the mix; torch only takes one mesh for all.
        for backend in backends:
            with about(f"backend {backend}, rank {rank}, norm_layer={norm_layer}"):
                results[backend].append(
                    _check_clip(params, backend, 2, mesh, compare_torch=not norm_layer))
    return results


def _same_on_every_rank(per_rank):
    for other in per_rank[1:]:
        assert other == per_rank[0]


@pytest.mark.slow
def test_fsdp2_one_dim_mesh():
    """FSDP2 on 2 ranks, fp32 and bf16 gradients, uneven and empty shards."""
    backends = cpu_backends()
    per_rank = spawn(_fsdp_rank, 2, backends)
    check_backends_ran(per_rank, backends)
    _same_on_every_rank(per_rank)


def _offload_rank(rank, world, backends, auto):
    """FSDP2 with ``CPUOffloadPolicy``: auto (asserted to pick ``auto``) and every backend against
    the oracle and torch's clip, on every norm type (no empty shard: torch's inf-norm runs too)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    # pin_memory=True pins through the CUDA driver: fully_shard raises without one.
    model = _fsdp_model(mesh, torch.float32, outputs=3,
                        offload_policy=CPUOffloadPolicy(pin_memory=False))
    _backward(model, rank, torch.float32)
    params = list(model.parameters())
    assert all(isinstance(p.grad, DTensor) and p.grad.device_mesh == mesh for p in params)
    shards = [p.grad.to_local() for p in params]  # what the backends clip
    assert all(g.device.type == "cpu" and g.numel() > 0 for g in shards)  # host memory, no empty
    assert all(g.count_nonzero() > 0 for g in shards)  # a real backward, never all zeros
    assert fusedclip.select_backend(shards) == auto
    results = {}
    for backend in (*backends, None):  # auto last, against its pick named
        with about(f"backend {backend}, rank {rank}"):
            norms = _check_clip(params, backend, 1, mesh, compare_torch=True)
            if backend is None:
                assert norms == results[auto], (norms, results[auto])  # the same bits
            else:
                results[backend] = norms
    return results


@pytest.mark.slow
def test_fsdp2_cpu_offload():
    """FSDP2 with ``CPUOffloadPolicy`` on 2 ranks: CPU local shards, which auto clips with the
    CPU engine (``cpp``; ``reference`` without the extension), bit for bit as naming it does; auto
    and every backend give torch's norm (1e-5) and the oracle's shards, as torch's clip does, for
    every norm type of ``CASES``, of which some clip and some do not."""
    backends = cpu_backends()
    auto = "cpp" if _lib.loaded() else "reference"
    per_rank = spawn(_offload_rank, 2, backends, auto)
    check_backends_ran(per_rank, backends)
    _same_on_every_rank(per_rank)
    over = [norm > max_norm for norm, (_, max_norm) in zip(per_rank[0][auto], CASES)]
    assert any(over) and not all(over), over  # some cases scale the gradients, some leave them


@pytest.mark.slow
def test_two_dim_mesh_tensor_parallel():
    """Tensor parallel on ``tp`` and FSDP2 on ``dp`` over 4 ranks, with and without gradients
    on the ``dp`` sub-mesh only."""
    backends = cpu_backends()
    per_rank = spawn(_mesh_2d_rank, 4, backends)
    check_backends_ran(per_rank, backends)
    _same_on_every_rank(per_rank)


# (shape, placements) on a 2x2 mesh: sharded over both mesh dimensions (also twice along one tensor
# dimension: 1 element over 4 ranks, three of them empty), over the first only (an empty tensor
# too), over the second only (HSDP: replicated over the first), and fully replicated.
CASES_2D = [((6, 5), "S0 S1"), ((7, 3), "S0 R"), ((0, 4), "S0 R"), ((5,), "R S0"),
            ((3, 2), "R R"), ((9, 2), "S1 S0"), ((1,), "S0 S0")]


def _placements(spec):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if s == "R" else Shard(int(s[1:])) for s in spec.split()]


def _dtensor_params(mesh, cases, seed):
    """Parameters whose gradients are random full tensors (the same on every rank) distributed
    over ``mesh`` with each case's placements; returns (params, full gradients)."""
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    params, fulls = [], []
    for shape, spec in cases:
        full = torch.randn(shape, generator=gen) * 2
        param = nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, _placements(spec)))
        param.grad = distribute_tensor(full, mesh, _placements(spec))
        params.append(param)
        fulls.append(full)
    return params, fulls


def _placements_rank(rank, world, backends, named):
    from torch.distributed.device_mesh import init_device_mesh

    names = ("dp", "tp") if named else None
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
    params, _ = _dtensor_params(mesh, CASES_2D, seed=7)
    # A second mesh with the same names and ranks: two more groups whose names alone tell them
    # apart from the first mesh's; every rank must reduce over the four in the same order.
    twin = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
    more, _ = _dtensor_params(twin, CASES_2D, seed=8)
    mixed = [q for pair in zip(params, more) for q in pair]
    results = {}
    for backend in backends:
        with about(f"backend {backend}, rank {rank}"):
            orders = []
            norms = _check_clip(params, backend, 2, mesh, compare_torch=True, orders=orders)
            norms += _check_clip(mixed, backend, 4, mesh, compare_torch=False, orders=orders)
        results[backend] = norms, orders
    return results


def _same_relative_order(orders_per_rank):
    """Every two ranks reduce over the groups they share in the same order."""
    for a in orders_per_rank:
        for b in orders_per_rank:
            for seq_a, seq_b in zip(a, b):
                shared = set(seq_a) & set(seq_b)
                assert [g for g in seq_a if g in shared] == [g for g in seq_b if g in shared]


@pytest.mark.slow
@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_every_placement_on_a_2d_mesh(named):
    """Shard/Replicate combinations on a 2x2 mesh, named and unnamed, and a second mesh with the
    same layout: the gathered oracle on every rank, one all-reduce per group, the same order
    of reductions on every rank."""
    backends = cpu_backends()
    per_rank = spawn(_placements_rank, 4, backends, named)
    check_backends_ran(per_rank, backends)
    for backend in backends:
        with about(f"backend {backend}"):
            _same_on_every_rank([results[backend][0] for results in per_rank])
            _same_relative_order([results[backend][1] for results in per_rank])


def _local(t):
    """A DTensor's local shard, a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _pipeline_rank(rank, world, backends):
    """Two pipeline stages, each FSDP-sharded over its own 2 ranks, each with a plain (replicated
    within the stage) parameter too; ``process_group`` is the pipeline group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage, dp, pp = mesh.get_coordinate()[0], mesh["dp"], mesh.get_group("pp")
    stage_cases = [[((6, 5), "S0"), ((3,), "S0"), ((1,), "S0")], [((4, 4), "S0"), ((11,), "S0")]]
    every = []  # both stages' full gradients, for the oracle
    for s, cases in enumerate(stage_cases):
        params, fulls = _dtensor_params(dp, cases, seed=20 + s)
        plain = torch.nn.Parameter(torch.zeros(5))
        plain.grad = torch.randn(5, generator=torch.Generator().manual_seed(30 + s))
        every += [*fulls, plain.grad.clone()]
        if s == stage:
            mine = [*params, plain]
    results = {}
    for backend in backends:
        with about(f"backend {backend}, rank {rank}"):
            results[backend] = _check_pipeline(mine, every, dp, pp, backend)
    return results


def _check_pipeline(mine, every, dp, pp, backend):
    from torch.distributed.tensor import DTensor

    start = [_local(q.grad).clone() for q in mine]
    norms = []
    for norm_type, max_norm in CASES:
        expected = oracle_norm(every, norm_type)
        coef = oracle_coef(max_norm, expected)
        with _counting_all_reduces() as calls:
            norm = fusedclip.clip_grad_norm_(mine, max_norm, norm_type, backend=backend,
                                             process_group=pp)
        assert [g.group_name for g in calls] == [dp.get_group().group_name, pp.group_name]
        assert isinstance(norm, DTensor) and norm.device_mesh == dp
        torch.testing.assert_close(norm.to_local().double(), torch.tensor(expected).double(),
                                   rtol=1e-5, atol=0)
        for q, g in zip(mine, start):
            torch.testing.assert_close(_local(q.grad).double(), g.double() * coef,
                                       rtol=2 * clip_rtol(g.dtype), atol=0)
            _local(q.grad).copy_(g)
        total = fusedclip.get_total_norm([q.grad for q in mine], norm_type, backend=backend,
                                         process_group=pp)
        torch.testing.assert_close(total.to_local(), norm.to_local(), rtol=0, atol=0)
        norms.append(float(norm.to_local()))
    for group in (dist.group.WORLD, dp.get_group()):  # they share ranks with the stage's mesh
        with pytest.raises(ValueError, match="shares ranks"):
            fusedclip.clip_grad_norm_(mine, 0.01, process_group=group, backend=backend)
    with pytest.raises(ValueError, match="mix DTensors and plain tensors"):
        fusedclip.clip_grad_norm_(mine, 0.01, backend=backend)
    assert all(torch.equal(_local(q.grad), g) for q, g in zip(mine, start))
    return norms


@pytest.mark.slow
def test_dtensors_with_a_pipeline_group():
    """FSDP2-style DTensors and plain tensors on two pipeline stages: ``process_group`` sums the
    stages' norms once, after the mesh reduction; groups overlapping the mesh are refused."""
    backends = cpu_backends()
    per_rank = spawn(_pipeline_rank, 4, backends)
    check_backends_ran(per_rank, backends)
    _same_on_every_rank(per_rank)
