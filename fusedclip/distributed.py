"""Norms over gradients spread across ranks: DTensor gradients (FSDP2, tensor parallel, 2-D
meshes) and plain tensors with ``process_group=`` (Megatron-style stages, or any split).

The global p-norm is that of the gradients as if gathered. Each rank computes the p-th power of the
norm of its local shards with the fused pass 1 (the max magnitude for the inf-norm), the powers are
summed (or maxed) across the ranks that hold *different* elements, every rank finishes the norm and
the clip coefficient on the device, and pass 2 scales its local shards. No host synchronization:
NCCL all-reduces are stream-ordered (gloo's are blocking by nature).

**DTensors.** A gradient is reduced over the mesh dimensions its placement shards (``Shard``,
``_StridedShard``), never over ``Replicate`` ones, whose ranks hold copies. Gradients are grouped
by the set of process groups they are sharded over (their *signature*; one for FSDP2, a few on a
2-D mesh), pass 1 runs once per signature, and then there is **one all-reduce per sharding mesh
dimension**: its buffer holds the partials of every signature sharded over it. Reductions run in
the order of the mesh dimensions' names, the same on every rank, so ranks that share some groups
but not others cannot wait on each other in a cycle. Meshes may differ between gradients (a 2-D
``(dp, tp)`` mesh for tensor-parallel layers and its ``dp`` sub-mesh for the rest, which torch's
own clip refuses); every rank of a mesh must pass the same parameters, as FSDP2 and tensor
parallelism arrange. ``Partial`` gradients (unreduced sums) are refused: their norm is not a
function of the local values. The norm is returned as torch returns it, a DTensor replicated
over the mesh (the one with the most dimensions when gradients sit on several).

**process_group=.** Plain tensors (and the DTensor total, when both are given) are summed over
the group last: its ranks hold different parameters.

Each buffer holds ``[value, isnan]`` pairs: ``value`` is ``local ** p`` reduced with SUM, or the
max magnitude with MAX for the inf-norm, never SUM; the NaN flag carries NaN through reductions
that would not propagate it. A rank without gradients takes part with a zero norm. ``local ** p``
is an fp64 power: for p above 2 with gradients near fp32's largest values it can overflow where
the single-rank pass (which scales by the largest magnitude) does not.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Local", "full", "group_device", "has_dtensor", "local_shards", "sharded_norm",
           "wrap_norm"]

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate
else:  # pragma: no cover - torch built without distributed
    DTensor = None

# The process groups a gradient's elements are split over, as (mesh dimension name, group name)
# pairs in reduction order; () for plain tensors and fully replicated DTensors.
Signature = tuple[tuple[str, str], ...]


def has_dtensor(tensors: list[Tensor]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


@dataclasses.dataclass
class Local:
    """The plain tensors a rank works on, and how their norms combine across ranks."""

    tensors: list[Tensor]  # each DTensor's local shard (the DTensor's storage), plain ones as given
    signatures: list[Signature]  # one per tensor
    mesh: object | None  # the mesh the norm is returned on; None without DTensors
    groups: dict[str, dist.ProcessGroup] = dataclasses.field(default_factory=dict)  # by name

    def order(self, dim: tuple[str, str]) -> tuple[str, tuple[int, ...]]:
        """Reduction order: by mesh dimension name, then by the group's ranks."""
        return dim[0], tuple(dist.get_process_group_ranks(self.groups[dim[1]]))


def _dim_name(mesh, dim: int) -> str:
    names = mesh.mesh_dim_names
    # Unnamed dims sort after named ones and by position, the same on every rank.
    return names[dim] if names else f"~{mesh.ndim}d:{dim}"


def local_shards(tensors: list[Tensor], name: str = "gradients") -> Local:
    """Splits DTensors into local shards and signatures; raises on ``Partial`` placements before
    anything is touched."""
    out = Local([], [], None)
    for i, t in enumerate(tensors):
        if DTensor is None or not isinstance(t, DTensor):
            out.tensors.append(t)
            out.signatures.append(())
            continue
        mesh, sig = t.device_mesh, []
        for dim, placement in enumerate(t.placements):
            if placement.is_partial():
                raise ValueError(
                    f"{name}[{i}] is a DTensor with a Partial placement on mesh dimension "
                    f"{_dim_name(mesh, dim)!r} (unreduced partial sums); reduce it (e.g. "
                    "redistribute to Shard or Replicate) before clipping"
                )
            if not placement.is_replicate():
                group = mesh.get_group(dim)
                out.groups[group.group_name] = group
                sig.append((_dim_name(mesh, dim), group.group_name))
        out.tensors.append(t.to_local())
        out.signatures.append(tuple(sorted(sig, key=lambda kv: out.order(kv))))
        if out.mesh is None or mesh.ndim > out.mesh.ndim:
            out.mesh = mesh
    return out


def full(t: object) -> object:
    """A DTensor's full value (no communication when it is replicated); anything else as is."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def wrap_norm(norm: Tensor, mesh) -> Tensor:
    """The norm as torch returns it for DTensor gradients: replicated over ``mesh``."""
    if mesh is None:
        return norm
    return DTensor.from_local(norm, mesh, [Replicate()] * mesh.ndim, run_check=False)


def group_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the all-reduce buffer of ``group`` lives: the current CUDA device for NCCL, else
    the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pair(local: Tensor, p: float) -> Tensor:
    """``[local ** p (or local for inf), isnan(local)]`` in fp64."""
    x = local.to(torch.float64)
    nan = torch.isnan(x)
    value = torch.where(nan, 0.0, x if math.isinf(p) else x.pow(p))
    return torch.stack([value, nan.to(torch.float64)])


def _all_reduce(pairs: list[Tensor], p: float, group: dist.ProcessGroup | None) -> list[Tensor]:
    """One all-reduce of the stacked pairs over ``group``; returns them reduced, where they were."""
    home = pairs[0].device
    buf = torch.stack(pairs).to(group_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM,
                    group=group)
    return list(buf.to(home).unbind(0))


def _combine(pairs: list[Tensor], p: float) -> Tensor:
    """The pair of the union of disjoint sets of elements."""
    if len(pairs) == 1:
        return pairs[0]
    stacked = torch.stack(pairs)
    value = stacked[:, 0].amax() if math.isinf(p) else stacked[:, 0].sum()
    return torch.stack([value, stacked[:, 1].sum()])


def _finish(pair: Tensor, p: float) -> Tensor:
    total = pair[0] if math.isinf(p) else pair[0].pow(1.0 / p)
    return torch.where(pair[1] > 0, math.nan, total)


def sharded_norm(
    local: Local,
    norm_type: float,
    local_norm: Callable[[list[Tensor]], Tensor],
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> Tensor:
    """The global norm (fp64 0-dim on ``device``) of ``local``'s tensors over their meshes and
    ``group``. ``local_norm`` is the fused pass 1 over a list of plain tensors."""
    by_sig: dict[Signature, list[Tensor]] = {}
    for t, sig in zip(local.tensors, local.signatures):
        by_sig.setdefault(sig, []).append(t)
    sigs = sorted(by_sig, key=lambda s: [local.order(dim) for dim in s])
    pairs = {s: _pair(local_norm(by_sig[s]).to(device), norm_type) for s in sigs}
    # One all-reduce per sharding mesh dimension (and group), over the partials of the signatures
    # sharded on it; every rank of a group holds the same signatures, so the buffers line up.
    for dim in sorted({dim for s in sigs for dim in s}, key=local.order):
        members = [s for s in sigs if dim in s]
        reduced = _all_reduce([pairs[s] for s in members], norm_type, local.groups[dim[1]])
        pairs.update(zip(members, reduced))
    if pairs:
        total = _combine([pairs[s] for s in sigs], norm_type)
    else:  # no tensors on this rank
        total = torch.zeros(2, dtype=torch.float64, device=device)
    if group is not None:
        total = _all_reduce([total], norm_type, group)[0]
    return _finish(total, norm_type)
