"""FSDP2 (``fully_shard``) training with fusedclip: DTensor gradients are clipped by the norm of
the whole model, from one all-reduce per sharding mesh dimension.

    torchrun --nproc-per-node 2 examples/fsdp2_training.py      # NCCL on GPUs, gloo on CPUs
    python examples/fsdp2_training.py --spawn 2                  # the same, without torchrun
    python examples/fsdp2_training.py --spawn 2 --cpu-offload    # gradients in host memory

Nothing else changes: ``fusedclip.clip_grad_norm_`` returns the norm as a DTensor replicated over
the mesh, as torch's does, and ``norm.full_tensor()`` reads it without communication. With
``--cpu-offload`` (FSDP2's ``CPUOffloadPolicy``) the sharded parameters, gradients and optimizer
state live in host memory: the gradients are DTensors with CPU local shards, which auto clips with
the compiled engine's CPU kernels (``cpp``), as it clips plain CPU tensors.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

import fusedclip

MAX_NORM = 0.5


def train(steps: int = 10, cpu_offload: bool = False) -> float:
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    mesh = init_device_mesh(device, (dist.get_world_size(),), mesh_dim_names=("dp",))
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 1)).to(device)
    # Pinned host memory makes the copies to and from a GPU faster; pinning needs its driver.
    policy = CPUOffloadPolicy(pin_memory=device == "cuda") if cpu_offload else OffloadPolicy()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1 + dist.get_rank())  # each rank its own data
    x = torch.randn(64, 32, device=device)
    y = x[:, :4].sum(1, keepdim=True)  # learn a sum
    losses = []
    clipped = torch.zeros((), dtype=torch.int64, device=device)  # steps whose norm was over
    for step in range(steps):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        norm = fusedclip.clip_grad_norm_(model.parameters(), MAX_NORM)  # a replicated DTensor
        clipped += norm.to_local() > MAX_NORM  # the whole model's norm, on every rank: no sync
        if step == steps - 1:  # the norm the optimizer sees, after clipping (only to show it)
            after = fusedclip.get_total_norm([p.grad for p in model.parameters()])
            shards = [p.grad.to_local() for p in model.parameters()]  # what the backend clips
            where, backend = shards[0].device.type, fusedclip.select_backend(shards)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    value, after_value = norm.full_tensor().item(), after.full_tensor().item()
    if dist.get_rank() == 0:
        setup = dist.get_backend() + (", CPU offload" if cpu_offload else "")
        print(f"{dist.get_world_size()} ranks ({setup}): loss "
              f"{losses[0].item():.4f} -> {losses[-1].item():.4f} in {steps} steps; last grad "
              f"norm {value:.4f} -> {after_value:.4f} (max_norm {MAX_NORM}); clipped "
              f"{clipped.item()} of {steps} steps; gradients on {where}, backend {backend}")
    return value


def _spawned(rank: int, world: int, init_file: str, steps: int, cpu_offload: bool) -> None:
    backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        train(steps, cpu_offload)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--spawn", type=int, metavar="N", help="start N ranks here (no torchrun)")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="FSDP2's CPUOffloadPolicy: parameters, gradients, optimizer state "
                             "in host memory")
    args = parser.parse_args()
    if args.spawn:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_spawned, args=(args.spawn, os.path.join(d, "init"), args.steps,
                                     args.cpu_offload), nprocs=args.spawn)
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(args.steps, args.cpu_offload)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
