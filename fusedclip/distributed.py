"""Norms over gradients spread across ranks: ``clip_grad_norm_(..., process_group=pg)``.

Each rank holds some of the gradients (Megatron-style tensor or pipeline parallel stages, or any
split). The global p-norm is that of the union: each rank computes its local norm with the fused
pass 1, one all-reduce of a two-value fp64 buffer combines them, every rank finishes the norm and
the clip coefficient on the device and rescales its own gradients with pass 2. No host
synchronization (NCCL all-reduces are stream-ordered; gloo's are blocking by nature).

The buffer is ``[local ** p, isnan(local)]`` reduced with SUM for p-norms, or
``[local, isnan(local)]`` with MAX for the inf-norm, never SUM; the NaN flag carries NaN through
reductions that would not propagate it. A rank without gradients takes part with a zero norm.
``local ** p`` is an fp64 power: for p above 2 with gradients near fp32's largest values it can
overflow where the single-rank pass (which scales by the largest magnitude) does not.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["reduce_norm", "group_device"]


def group_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the all-reduce buffer of ``group`` lives: the current CUDA device for NCCL, else
    the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_norm(local: Tensor, norm_type: float, group: dist.ProcessGroup | None) -> Tensor:
    """The norm over every rank of ``group`` from this rank's fp64 local norm: one all-reduce of
    two fp64 values; returns the global norm, fp64 0-dim on ``local``'s device."""
    device = group_device(group)
    x = local.to(device=device, dtype=torch.float64)
    nan = torch.isnan(x)
    value = torch.where(nan, 0.0, x if math.isinf(norm_type) else x.pow(norm_type))
    buf = torch.stack([value, nan.to(torch.float64)])
    op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
    dist.all_reduce(buf, op=op, group=group)
    total = buf[0] if math.isinf(norm_type) else buf[0].pow(1.0 / norm_type)
    return torch.where(buf[1] > 0, math.nan, total).to(local.device)
