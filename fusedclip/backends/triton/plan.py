"""Plans for the Triton kernels, built in Python: a documented mirror of csrc/engine/plan.cpp.

A plan lays a list of dense tensors out as the table of csrc/engine/table.h (``addr[T]``,
``numel[T]``, ``first_chunk[T]``, ``chunk_tensor[C]``, chunks of ``CHUNK`` elements) with the
chunks grouped by dtype and 16-byte alignment, in the same order as the C++ plan, so both walk
identical tables (tests/engine/test_ops.py compares them). Plans are cached by every tensor's
address, size and dtype and reused while the storages stay the same; building one is a blocking
host-to-device copy, refused inside a CUDA graph capture. Keying costs a few hundred nanoseconds
of Python per tensor: when ``fusedclip._C`` is built, ``clip_grad_norm_`` takes its
C++ plan instead (``of_params``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading

import torch
from torch import Tensor

from fusedclip.backends._multi_tensor import KERNEL_DTYPES, is_dense
from fusedclip.backends.cpp import _lib

__all__ = ["Group", "Plan", "of_params", "plan_for", "plans_built"]

CHUNK = 1 << 16  # elements per chunk: csrc/engine/table.h kChunkElems (a test compares them)
CACHE_SIZE = 8  # as csrc/engine/plan.cpp kCacheSize


@dataclasses.dataclass(frozen=True)
class Group:
    """The chunks [chunk_lo, chunk_hi) of one dtype and alignment: one launch per pass."""

    dtype: torch.dtype
    aligned: bool  # every tensor's base address is a multiple of 16 bytes: vector accesses
    chunk_lo: int
    chunk_hi: int


@dataclasses.dataclass(frozen=True)
class Plan:
    device: torch.device
    table: Tensor  # int64 [3 * T + C] on device
    num_tensors: int
    num_chunks: int
    groups: tuple[Group, ...]
    result_dtype: torch.dtype  # of the returned norm: the dtypes and float32 promoted together


Key = tuple[int, int, torch.dtype]  # (address, numel, dtype); address 0 for an empty tensor

_PLANS: collections.OrderedDict[tuple, Plan] = collections.OrderedDict()
# Plans a captured CUDA graph reads: never evicted (the graph holds their table's address).
_PINNED: dict[tuple, Plan] = {}
_LOCK = threading.Lock()
_built = 0


def plans_built() -> int:
    """Plans built by this module since the process started (tests of reuse and eviction)."""
    return _built


def clear_cache() -> None:
    """Drops every cached plan that no captured CUDA graph reads."""
    with _LOCK:
        _PLANS.clear()


def check_plain(tensors: list[Tensor]) -> None:
    """What the kernels take as it is, with csrc/engine/plan.cpp check_plain's rules and messages:
    strided, a kernel dtype, on one device, dense (contiguous or permuted: no gaps, no overlap)."""
    if not tensors:
        raise RuntimeError("fusedclip: expected at least one tensor")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.layout != torch.strided:
            raise RuntimeError(f"tensors[{i}] has layout {t.layout}; the fused backends take "
                               "strided (dense) tensors only")
        if t.dtype not in KERNEL_DTYPES:
            raise RuntimeError(f"tensors[{i}] has dtype {t.dtype}; expected float32, float64, "
                               "float16 or bfloat16")
        if t.device != device:
            raise RuntimeError(f"tensors[{i}] is on {t.device} but tensors[0] is on {device}")
        if not is_dense(t):
            raise RuntimeError(f"tensors[{i}] is a view with gaps or overlapping elements; the "
                               "fused kernels take dense tensors (contiguous or permuted)")


def _key(t: Tensor) -> Key:
    n = t.numel()
    return (t.data_ptr() if n else 0, n, t.dtype)


def _check_disjoint(keys: list[Key]) -> None:
    """csrc/engine/plan.cpp ``check_disjoint``, with its words (fusedclip/_args.py's)."""
    spans = sorted(
        (addr, addr + n * torch.empty((), dtype=dt).element_size(), i)
        for i, (addr, n, dt) in enumerate(keys) if n
    )
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(
                f"gradients[{min(i, j)}] and gradients[{max(i, j)}] share memory (the same "
                "tensor twice, or views of one buffer); fusedclip takes every element once: give "
                "each its own storage (.clone())"
            )


def build(keys: list[Key], device: torch.device, written: bool = True) -> Plan:
    """A new plan for ``keys`` on ``device`` (csrc/engine/plan.cpp ``build``); its tensors may
    share memory only when none is ``written``."""
    global _built
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "backend 'triton' cannot build a plan inside a CUDA graph capture (its table is "
            "uploaded with a blocking copy); call it once on the same gradients before capturing"
        )
    if written:
        _check_disjoint(keys)
    n = len(keys)
    first_chunk = [0] * n
    chunk_tensor: list[int] = []
    groups = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for aligned in (True, False):
            lo = len(chunk_tensor)
            for t, (addr, numel, dt) in enumerate(keys):
                if dt == dtype and (addr % 16 == 0) == aligned:
                    first_chunk[t] = len(chunk_tensor)
                    chunk_tensor += [t] * -(-numel // CHUNK)
            if len(chunk_tensor) > lo:
                groups.append(Group(dtype, aligned, lo, len(chunk_tensor)))
    host = [k[0] for k in keys] + [k[1] for k in keys] + first_chunk + chunk_tensor
    table = torch.tensor(host, dtype=torch.int64).to(device)
    result_dtype = functools.reduce(torch.promote_types, (k[2] for k in keys), torch.float32)
    _built += 1
    return Plan(device, table, n, len(chunk_tensor), tuple(groups), result_dtype)


def unit_keys(tensors: list[Tensor]) -> list[Key]:
    """Adaptive clipping's units as plan entries (csrc/engine ``append_units``): each row of a
    tensor of two or more dims, the whole tensor otherwise, none for an empty one."""
    keys = []
    for t in tensors:
        n = t.numel()
        if n:
            rows = t.shape[0] if t.dim() > 1 else 1
            step, base = n // rows * t.element_size(), t.data_ptr()
            keys += [(base + i * step, n // rows, t.dtype) for i in range(rows)]
    return keys


def plan_for(tensors: list[Tensor], units: bool = False, written: bool = True) -> Plan:
    """The cached plan of ``tensors`` (checked: ``check_plain``), or a new one. With ``units`` its
    entries are adaptive clipping's units (``unit_keys``, contiguous tensors). Tensors that are
    not ``written`` (adaptive clipping's parameters) may share memory: their plans are cached
    apart, never handed to a call that writes."""
    check_plain(tensors)
    device = tensors[0].device
    if units:
        key = (device, "units", written,
               tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors))
    else:
        keys = [_key(t) for t in tensors]
        key = (device, tuple(keys)) if written else (device, "read", tuple(keys))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    with _LOCK:
        plan = _PLANS.get(key) or _PINNED.get(key)
        if plan is None:
            plan = build(unit_keys(tensors) if units else keys, device, written)
            _PLANS[key] = plan
            while len(_PLANS) > CACHE_SIZE:
                _PLANS.popitem(last=False)
        elif key in _PLANS:
            _PLANS.move_to_end(key)
        if capturing:
            _PINNED[key] = plan
        elif device.type == "cuda":
            # Used on another stream than the one that allocated it: keep its memory from being
            # reused before this stream's kernels are done with it.
            plan.table.record_stream(torch.cuda.current_stream(device))
    return plan


def of_params(
    params: list[Tensor], cuda_only: bool, writing: bool, unscaling: bool, device_type: str
) -> Plan | None:
    """The C++ plan (``fusedclip._C``) of the ``.grad``s of ``params`` when they are all plain and
    on one ``device_type`` device, else None (also without ``fusedclip._C``). Unscaling
    GradScaler's gradients, fp16 ones also give None (the general path refuses them). ``writing``:
    their version counters are bumped (they are about to be scaled)."""
    if not _lib.loaded():
        return None
    info = _lib.module().plan_of_params(params, cuda_only, writing, not unscaling)
    if info is None:
        return None
    table, num_tensors, num_chunks, result_dtype, groups = info
    if table.device.type != device_type:
        return None
    return Plan(table.device, table, num_tensors, num_chunks,
                tuple(Group(*g) for g in groups), result_dtype)
