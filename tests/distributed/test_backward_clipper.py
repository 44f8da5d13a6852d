"""``BackwardClipper`` with DDP and FSDP2, on 2 gloo ranks on the CPU.

DDP: the partials are taken of the averaged gradients, in the communication hook that wraps the
all-reduce (or the user's own hook); accumulation under ``no_sync`` counts the final averaged
gradients only. FSDP2: the hooks run on the reduced shards, and the norm is finished with one
all-reduce over the mesh. Each rank trains a model with the clipper and a twin that clips the torch
way (``clip_grad_norm_`` after backward, then the step), with every backend that runs CPU tensors
here in turn, and compares: the norm with the fp64 oracle of the full gradients before the step,
the parameters with the twin's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from oracle import oracle_coef, oracle_norm
from ranks import about, check_backends_ran, cpu_backends, spawn
from torch import nn

import fusedclip
from fusedclip.torch_patch import torch_function

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="needs torch.distributed with gloo")]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 13), nn.Tanh(), nn.Linear(13, 3))


def _batches(rank, count):
    gen = torch.Generator().manual_seed(50 + rank)
    return [torch.randn(5, 8, generator=gen) for _ in range(count)]


def _counting_hook(calls):
    """A user's own communication hook: averages as DDP does, and counts its buckets."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def _ddp_rank(rank, world, backends):
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for backend in backends:
        with about(f"rank {rank}, {backend}"):
            model, twin = DDP(_mlp()), DDP(_mlp())
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
            calls = []
            clipper = fusedclip.BackwardClipper(
                model, 0.05, optimizer=opt, backend=backend, comm_hook=_counting_hook(calls),
                comm_state=None)
            norms = []
            for step in range(3):
                first, last = _batches(rank * 10 + step, 2)
                with model.no_sync(), twin.no_sync():  # a micro-batch that only accumulates
                    model(first).pow(2).sum().backward()
                    twin(first).pow(2).sum().backward()
                model(last).pow(2).sum().backward()
                twin(last).pow(2).sum().backward()
                grads = [p.grad.clone() for p in model.parameters()]
                opt.step()
                torch_function("clip_grad_norm_")(list(twin.parameters()), 0.05)
                twin_opt.step()
                opt.zero_grad()
                twin_opt.zero_grad()
                expected = oracle_norm(grads, 2.0)
                assert expected > 0.05
                torch.testing.assert_close(clipper.last_norm.double(),
                                           torch.tensor(expected, dtype=torch.float64),
                                           rtol=1e-5, atol=0)
                for p, q in zip(model.parameters(), twin.parameters()):
                    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
                norms.append(float(clipper.last_norm))
            assert calls, "the user's communication hook never ran"
            clipper.remove()
            results[backend] = norms
    return results


def test_ddp_takes_the_partials_of_the_averaged_gradients():
    backends = cpu_backends()
    per_rank = spawn(_ddp_rank, 2, backends)
    check_backends_ran(per_rank, backends)
    for backend in backends:
        assert per_rank[0][backend] == per_rank[1][backend]  # every rank clips by one norm


def _fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp_rank(rank, world, backends):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for backend, fused in [(b, f) for b in backends for f in (False, True)]:
        with about(f"rank {rank}, {backend}, fused={fused}"):
            model, twin = _fsdp_model(mesh), _fsdp_model(mesh)
            # fused: the coefficient folded into fused AdamW's step over DTensor parameters
            # (torch has no DTensor rule for fused SGD)
            make = ((lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)) if fused
                    else (lambda m: torch.optim.SGD(m.parameters(), lr=0.5)))
            opt, twin_opt = make(model), make(twin)
            clipper = fusedclip.BackwardClipper(model, 0.05, optimizer=opt, backend=backend)
            norms = []
            for step in range(2):
                for x in _batches(rank * 10 + step, 2):  # two accumulated micro-batches
                    model(x).pow(2).sum().backward()
                    twin(x).pow(2).sum().backward()
                full = [p.grad.full_tensor() for p in model.parameters()]
                opt.step()
                torch_function("clip_grad_norm_")(list(twin.parameters()), 0.05)
                twin_opt.step()
                opt.zero_grad()
                twin_opt.zero_grad()
                expected = oracle_norm(full, 2.0)
                assert expected > 0.05
                torch.testing.assert_close(clipper.last_norm.double(),
                                           torch.tensor(expected, dtype=torch.float64),
                                           rtol=1e-5, atol=0)
                coef = oracle_coef(0.05, expected)
                assert coef < 1
                for p, q in zip(model.parameters(), twin.parameters()):
                    torch.testing.assert_close(p.to_local(), q.to_local(), rtol=1e-5, atol=1e-7)
                norms.append(float(clipper.last_norm))
            clipper.remove()
            results[backend, fused] = norms
    return results


def test_fsdp2_takes_the_partials_of_the_reduced_shards():
    backends = cpu_backends()
    per_rank = spawn(_fsdp_rank, 2, backends)
    assert [list(r) for r in per_rank] == [[(b, f) for b in backends for f in (False, True)]] * 2
    for key in per_rank[0]:
        assert per_rank[0][key] == per_rank[1][key]
