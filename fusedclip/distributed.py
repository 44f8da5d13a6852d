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
dimension**: its buffer holds the partials of every signature sharded over it, in the order the
signatures first appear among the gradients. Reductions run in one global order of the groups
(the mesh dimension's name, then the group's ranks, then its name: the same on every rank of the
group), so ranks that share some groups but not others never wait on each other in a cycle, and
two meshes with the same names and ranks (``init_device_mesh`` called twice) stay apart. Meshes
may differ between gradients (a 2-D ``(dp, tp)`` mesh for tensor-parallel layers and its ``dp``
sub-mesh for the rest, which torch's own clip refuses). ``Partial`` gradients (unreduced sums)
are refused: their norm is not a function of the local values. Plain tensors beside DTensors
are refused without ``process_group=`` (each rank would add its own, and ranks would clip by
different norms). The norm is returned as torch returns it, a DTensor replicated over the mesh
(the one with the most dimensions when gradients sit on several).

**Every rank of a group must make the same call** with the same parameters in the same order, as
FSDP2, tensor parallelism and DDP arrange: a rank that passes other gradients (a gradient that is
``None`` on one rank only, a different model) waits forever in a collective, as with torch's own
clip. The argument checks are local: where only some ranks fail them (a pipeline stage whose
DTensors' mesh overlaps ``process_group`` beside a stage of plain tensors), those raise and the
others wait in the collective until the group's timeout. The all-reduce buffers go to the
machine's accelerator when the group has a stream-ordered backend for it (NCCL for CUDA, also in
a ``"cpu:gloo,cuda:nccl"`` configuration), and to the CPU otherwise (gloo, which blocks anyway):
a choice that depends on the group alone, so that a rank without gradients makes it as well.

**process_group=.** Plain tensors (and the DTensor total, when both are given) are summed over
the group last: its ranks hold different parameters (pipeline stages, Megatron-style tensor
parallel shards). A group that shares ranks with a DTensor's mesh would count that mesh's
gradients twice and is refused. Plain tensors beside DTensors must then be the same on every
rank of the DTensors' mesh (replicated), which is not checked.

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

__all__ = ["Local", "backend_map", "buffer_device_type", "check_group", "full", "group_device",
           "has_dtensor", "local_shards", "refuse_dtensors", "sharded_norm", "wrap_norm"]

if dist.is_available():
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed.tensor import DTensor, Replicate
else:  # pragma: no cover - torch built without distributed
    DTensor = None

# A mesh dimension that shards a gradient, as (dimension name, group ranks, group name): every
# field is the same on every rank of the group (torch names groups collectively), so sorting these
# gives one order of the groups for all ranks.
Dim = tuple[str, tuple[int, ...], str]
# The dimensions a gradient's elements are split over, sorted; () for plain tensors and fully
# replicated DTensors.
Signature = tuple[Dim, ...]


def has_dtensor(tensors: list[Tensor]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


@dataclasses.dataclass
class Local:
    """The plain tensors a rank works on, and how their norms combine across ranks."""

    tensors: list[Tensor] = dataclasses.field(default_factory=list)  # DTensors' local shards
    signatures: list[Signature] = dataclasses.field(default_factory=list)  # one per tensor
    groups: dict[str, dist.ProcessGroup] = dataclasses.field(default_factory=dict)  # by name
    meshes: dict[int, object] = dataclasses.field(default_factory=dict)  # every DTensor's, by id
    plain: bool = False  # whether some tensor is not a DTensor

    @property
    def mesh(self) -> object | None:
        """The mesh the norm is returned on: the first with the most dimensions; None without
        DTensors."""
        return max(self.meshes.values(), key=lambda mesh: mesh.ndim, default=None)


def _dim_name(mesh, dim: int) -> str:
    names = mesh.mesh_dim_names
    # Unnamed dims sort after named ones and by position, the same on every rank.
    return names[dim] if names else f"~{mesh.ndim}d:{dim}"


def local_shards(tensors: list[Tensor], name: str = "gradients") -> Local:
    """Splits DTensors into local shards and signatures; raises on ``Partial`` placements before
    anything is touched."""
    out = Local()
    dims: dict[tuple[int, int], Dim] = {}  # (id(mesh), mesh dim) -> Dim, looked up once
    for i, t in enumerate(tensors):
        if DTensor is None or not isinstance(t, DTensor):
            out.tensors.append(t)
            out.signatures.append(())
            out.plain = True
            continue
        mesh, sig = t.device_mesh, []
        for dim, placement in enumerate(t.placements):
            if placement.is_partial():
                raise ValueError(
                    f"{name}[{i}] is a DTensor with a Partial placement on mesh dimension "
                    f"{_dim_name(mesh, dim)!r} (unreduced partial sums); reduce it (e.g. "
                    "redistribute to Shard or Replicate) before clipping"
                )
            if placement.is_replicate():
                continue
            key = (id(mesh), dim)
            if key not in dims:
                group = mesh.get_group(dim)
                out.groups[group.group_name] = group
                dims[key] = (_dim_name(mesh, dim), tuple(dist.get_process_group_ranks(group)),
                             group.group_name)
            sig.append(dims[key])
        out.tensors.append(t.to_local())
        out.signatures.append(tuple(sorted(sig)))
        out.meshes.setdefault(id(mesh), mesh)
    return out


def refuse_dtensors(grads: list[Tensor], what: str) -> None:
    """For the functions that do not reduce over meshes: a TypeError before anything is touched."""
    if has_dtensor(grads):
        raise TypeError(f"{what} does not take DTensor gradients yet: its norms of sharded "
                        "gradients would need their own reductions over the mesh")


def check_group(local: Local, group: dist.ProcessGroup | None) -> None:
    """Refuses, before any communication, what would give ranks different norms: plain tensors
    beside DTensors without ``group``, and a ``group`` that shares ranks with a DTensor's mesh
    (its gradients would be counted twice). The check is this rank's alone (module docstring)."""
    if group is None:
        if local.plain and local.meshes:
            raise ValueError(
                "gradients mix DTensors and plain tensors: each rank would add its own plain "
                "gradients and ranks would clip by different norms. Make them DTensors (e.g. "
                "Replicate over the mesh), or pass process_group= if the plain gradients are this "
                "rank's share of a model split over the group's ranks"
            )
        return
    me = dist.get_rank()
    ranks = set(dist.get_process_group_ranks(group))
    for mesh in local.meshes.values():
        shared = sorted((ranks & set(mesh.mesh.flatten().tolist())) - {me})
        if shared:
            raise ValueError(
                f"process_group shares ranks {shared} with the device mesh of DTensor gradients "
                f"({mesh}); those are already reduced over the mesh and would be counted twice. "
                "Pass a group whose other ranks hold other parameters (e.g. the pipeline-parallel "
                "group), or no process_group"
            )


def full(t: object) -> object:
    """A DTensor's full value (no communication when it is replicated); anything else as is."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def wrap_norm(norm: Tensor, mesh) -> Tensor:
    """The norm as torch returns it for DTensor gradients: replicated over ``mesh``."""
    if mesh is None:
        return norm
    return DTensor.from_local(norm, mesh, [Replicate()] * mesh.ndim, run_check=False)


def group_device(group: dist.ProcessGroup | None, near: torch.device | None) -> torch.device:
    """Where ``group``'s all-reduce buffers live. The kind of device depends on the group and the
    machine alone, never on this rank's gradients, so that every rank (one without gradients too)
    reduces with the same backend; the device itself is ``near`` (this rank's gradients') when it
    is of that kind, else the current one."""
    accelerator = None
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator().type
    config = dist.get_backend_config(group)
    kind = buffer_device_type(backend_map(config), accelerator, config)
    if near is not None and near.type == kind:
        return near
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, torch.accelerator.current_device_index())


def backend_map(config: str) -> dict[str, str]:
    """Device type -> backend from a group's backend configuration (``"cpu:gloo,cuda:nccl"``,
    or a bare backend name, which serves every device type it supports)."""
    if ":" not in config:
        return {kind: config for kind in dist.Backend.backend_capability.get(config, ["cpu"])}
    return dict(part.split(":", 1) for part in config.split(","))


def buffer_device_type(backends: dict[str, str], accelerator: str | None,
                       config: str = "") -> str:
    """The machine's accelerator when the group reduces there without blocking the host (any
    backend but gloo: NCCL on CUDA), else the CPU when the group has a backend for it, else the
    accelerator."""
    if accelerator is not None and backends.get(accelerator, "gloo") != "gloo":
        return accelerator
    if "cpu" in backends:
        return "cpu"
    if accelerator is not None and accelerator in backends:
        return accelerator
    raise RuntimeError(f"the process group's backends ({config or backends}) serve neither the "
                       f"CPU nor this machine's accelerator ({accelerator or 'none'})")


def _pair(local: Tensor, p: float) -> Tensor:
    """``[local ** p (or local for inf), isnan(local)]`` in fp64."""
    x = local.to(torch.float64)
    nan = torch.isnan(x)
    value = torch.where(nan, 0.0, x if math.isinf(p) else x.pow(p))
    return torch.stack([value, nan.to(torch.float64)])


def _all_reduce(pairs: list[Tensor], p: float, group: dist.ProcessGroup | None) -> list[Tensor]:
    """One all-reduce of the stacked pairs over ``group``; returns them reduced, where they were."""
    home = pairs[0].device
    buf = torch.stack(pairs).to(group_device(group, home))
    # The functional collective, as torch's own clip issues it: tools that count collectives
    # (CommDebugMode) see the same, and torch.compile traces it. Reading the result waits for it.
    reduced = funcol.all_reduce(buf, "max" if math.isinf(p) else "sum", group)
    return list(funcol.wait_tensor(reduced).to(home).unbind(0))


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
    by_sig: dict[Signature, list[Tensor]] = {}  # in order of first appearance, as on every rank
    for t, sig in zip(local.tensors, local.signatures):
        by_sig.setdefault(sig, []).append(t)
    sigs = list(by_sig)
    pairs = {s: _pair(local_norm(by_sig[s]).to(device), norm_type) for s in sigs}
    # One all-reduce per sharding mesh dimension (and group), over the partials of the signatures
    # sharded on it, in one order of the groups for all ranks. Every rank of a group passes the
    # same parameters in the same order, so its signatures sharded over the group come in the
    # same order on every rank and the buffers line up.
    for dim in sorted({dim for s in sigs for dim in s}):
        members = [s for s in sigs if dim in s]
        reduced = _all_reduce([pairs[s] for s in members], norm_type, local.groups[dim[2]])
        pairs.update(zip(members, reduced))
    if pairs:
        total = _combine([pairs[s] for s in sigs], norm_type)
    else:  # no tensors on this rank
        total = torch.zeros(2, dtype=torch.float64, device=device)
    if group is not None:
        total = _all_reduce([total], norm_type, group)[0]
    return _finish(total, norm_type)
