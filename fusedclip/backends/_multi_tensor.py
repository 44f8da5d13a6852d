"""``FusedBackend``: the ``Backend`` contract on top of one backend's multi-tensor operators.

The ``cpp`` and ``triton`` backends are instances of it. Their operators (``Operators``) take
dense tensors of the kernel dtypes on one device and make the two passes of the fused clip; this
class adds what both need around them: the checks that run before anything is touched, several
devices reduced one by one and combined, and what the kernels cannot read in place (strided views
with gaps, negative views, ZeroTensors) processed through a dense copy that is written back. (The
public functions have checked by then that no two gradients share memory: fusedclip._args
check_disjoint, on the tensors as given, not on their copies.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from fusedclip.backends import BackendStatus
from fusedclip.backends._math import clip_coef, combine_norms

__all__ = ["KERNEL_DTYPES", "FusedBackend", "Operators", "by_device", "is_dense", "kernels_take"]

KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Operators:
    """A backend's operators, all with the schemas of ``torch.ops.fusedclip`` (csrc/ops.cpp):

    norm(tensors, norm_type, max_norm, per_tensor, inv_scale, found_inf, soft) -> (fp64 norm, fp64
    coefficient, per-tensor norms or empty): pass 1; clip(tensors, max_norm, norm_type, per_tensor,
    inv_scale, found_inf, soft) -> (fp64 norm, per-tensor norms or empty): both passes; scale(
    tensors, coef); clip_per_tensor(tensors, max_norms, norm_type, soft) -> per-tensor norms;
    clamp(tensors, clip_value); adaptive_clip(grads, params, clip_factor, eps, norm_type);
    partials(tensors, norm_type, out): each tensor's (m, s) partial into out's rows;
    finish(partials, norm_type, max_norm, inv_scale, found_inf, soft) -> (fp64 norm, fp64
    coefficient) of partials combined in row order."""

    norm: Callable[..., tuple[Tensor, Tensor, Tensor]]
    clip: Callable[..., tuple[Tensor, Tensor]]
    scale: Callable[[list[Tensor], Tensor], None]
    clip_per_tensor: Callable[[list[Tensor], Tensor, float, bool], Tensor]
    clamp: Callable[[list[Tensor], float], None]
    adaptive_clip: Callable[[list[Tensor], list[Tensor], float, float, float], None]
    partials: Callable[[list[Tensor], float, Tensor], None]
    finish: Callable[..., tuple[Tensor, Tensor]]


# The one-call path of a backend: run_params(params, max_norm, norm_type, cuda_only, inv_scale,
# found_inf, soft, scale) -> (the norm in its returned dtype, the fp64 factor, the fp64 norm) after
# pass 1 and, with ``scale``, pass 2; None when some gradient needs the general path.
ParamsPath = Callable[..., tuple[Tensor, Tensor, Tensor] | None]
# The one-call value clip: clamp_params(params, clip_value, cuda_only) -> True when done, False
# when some gradient needs the general path.
ClampPath = Callable[[list[Tensor], float, bool], bool]


def kernels_take(tensors: list[Tensor]) -> bool:
    """Whether every tensor is a dense-layout tensor of a kernel dtype (gaps are fine: staged)."""
    return all(t.layout == torch.strided and t.dtype in KERNEL_DTYPES for t in tensors)


def by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    """The tensors grouped by device, in order of first appearance."""
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def is_dense(t: Tensor) -> bool:
    """Contiguous up to a permutation of its dims: no gaps, no element stored twice."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=t.stride, reverse=True)
    return t.permute(order).is_contiguous()


def _values_as_stored(t: Tensor) -> bool:
    """Whether ``t``'s memory holds its values: no negative bit (which a mutable operator argument
    may not carry), and memory of its own (not a ZeroTensor). (Under torch.compile, which does not
    trace these flags of a graph input, taken as so.)"""
    return torch.compiler.is_compiling() or not (t.is_neg() or t._is_zerotensor())


def _in_place_readable(t: Tensor) -> bool:
    """Whether the kernels can take ``t`` as it is: dense, and its values as stored."""
    return is_dense(t) and _values_as_stored(t)


def dense_staged(tensors: list[Tensor]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The tensors the kernels can read in place, with a dense copy standing in for each other
    one (a strided view with gaps, a negative view, a ZeroTensor); and the (view, copy) pairs to
    write back after an in-place pass."""
    staged, write_back = [], []
    for t in tensors:
        if _in_place_readable(t):
            staged.append(t)
        else:
            copy = t.resolve_neg().clone(memory_format=torch.contiguous_format)
            staged.append(copy)
            write_back.append((t, copy))
    return staged, write_back


def _in_place(tensors: list[Tensor], run: Callable[[list[Tensor]], object]) -> object:
    """``run`` on the dense stand-ins of ``tensors`` (one device), then views with gaps get their
    copies' new values back."""
    staged, write_back = dense_staged(tensors)
    result = run(staged)
    for view, copy in write_back:
        view.copy_(copy)
    return result


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without the host waiting: a host tensor goes through pinned memory."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _no_params_path(*args: object) -> None:
    return None


def _no_clamp_path(*args: object) -> bool:
    return False


class FusedBackend:
    """A ``Backend`` (see ``fusedclip.backends``) made of multi-tensor operators."""

    def __init__(
        self,
        name: str,
        ops: Operators,
        status: Callable[[], BackendStatus],
        run_params: ParamsPath = _no_params_path,
        run_clamp: ClampPath = _no_clamp_path,
    ) -> None:
        self.NAME = name
        self.ops = ops
        self._find_status = status
        self._status: BackendStatus | None = None
        self._run_params = run_params
        self._run_clamp = run_clamp

    def __repr__(self) -> str:
        return f"<fusedclip backend {self.NAME!r}>"

    def status(self) -> BackendStatus:
        """Found once per process (a plain attribute: ``torch.compile`` reads it with a guard)."""
        if self._status is None:
            self._status = self._find_status()
        return self._status

    # ---- checks, device groups, staging ------------------------------------------------------

    def _groups(
        self, tensors: list[Tensor], one_device: str | None = None
    ) -> dict[torch.device, list[Tensor]]:
        """Raises for what the operators cannot take at all, before anything is touched; the
        tensors by device (only one allowed when ``one_device`` names why)."""
        status = self.status()
        for i, t in enumerate(tensors):
            if t.layout != torch.strided:
                raise TypeError(
                    f"gradients[{i}] is a {t.layout} tensor; backend {self.NAME!r} takes dense "
                    "gradients only (use backend='reference' for sparse ones)"
                )
            if t.dtype not in KERNEL_DTYPES:
                raise TypeError(
                    f"gradients[{i}] has dtype {t.dtype}; backend {self.NAME!r} takes float32, "
                    "float64, float16 and bfloat16 (use backend='reference' for complex ones)"
                )
            if not status.runs_on(t.device.type):
                raise RuntimeError(
                    f"backend {self.NAME!r} runs {' and '.join(status.devices) or 'no'} tensors "
                    f"here, but gradients[{i}] is on {t.device} ({status.reason})"
                )
        groups = by_device(tensors)
        if one_device and len(groups) > 1:
            raise ValueError(
                f"backend {self.NAME!r}: {one_device} takes the gradients of one device at a time"
            )
        return groups

    # ---- the Backend contract --------------------------------------------------------------------

    def clip_params(
        self,
        params: list[Tensor],
        max_norm: float,
        norm_type: float,
        *,
        cuda_only: bool = True,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        soft: bool = False,
    ) -> Tensor | None:
        """``clip_grad_norm_`` on the ``.grad``s of ``params`` in one call (read and checked in
        C++, the cached plan, both passes): the norm in its returned dtype, or None for the general
        path. ``inv_scale``/``found_inf``: the AMP path; ``soft``: the soft coefficient."""
        done = self._run_params(params, max_norm, norm_type, cuda_only, inv_scale, found_inf,
                                soft, True)
        return None if done is None else done[0]

    def norm_params(
        self,
        params: list[Tensor],
        max_norm: float,
        norm_type: float,
        *,
        cuda_only: bool = True,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        soft: bool = False,
    ) -> tuple[Tensor, Tensor] | None:
        """Pass 1 of ``clip_params`` alone: (the norm in its returned dtype, the fp64 factor that
        would unscale and clip), gradients untouched; None for the general path."""
        done = self._run_params(params, max_norm, norm_type, cuda_only, inv_scale, found_inf,
                                soft, False)
        return None if done is None else done[:2]

    def clip_stats_params(
        self, params: list[Tensor], max_norm: float, norm_type: float, *, cuda_only: bool = True,
        soft: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``clip_params`` returning what ``return_stats=True`` reports: (the norm in its returned
        dtype, the fp64 coefficient, the fp64 norm); None for the general path."""
        return self._run_params(params, max_norm, norm_type, cuda_only, None, None, soft, True)

    def total_norm(
        self,
        tensors: list[Tensor],
        norm_type: float,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Tensor:
        amp = "the AMP path" if inv_scale is not None or found_inf is not None else None
        norms = [self.ops.norm(dense_staged(ts)[0], norm_type, float("inf"), False, inv_scale,
                               found_inf, False)[0]
                 for ts in self._groups(tensors, amp).values()]
        return norms[0] if len(norms) == 1 else combine_norms(norms, norm_type)

    def scale_(self, tensors: list[Tensor], coef: Tensor) -> None:
        for device, ts in self._groups(tensors).items():
            c = coef.to(device=device, dtype=torch.float64).reshape(())
            _in_place(ts, lambda staged, c=c: self.ops.scale(staged, c))

    def clip_with_norm_(
        self, tensors: list[Tensor], max_norm: float, norm: Tensor, soft: bool = False
    ) -> None:
        self.scale_(tensors, clip_coef(max_norm, norm, soft))

    def clip_(
        self,
        tensors: list[Tensor],
        max_norm: float,
        norm_type: float,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        soft: bool = False,
    ) -> Tensor:
        """Both passes in one call when the gradients are on one device."""
        amp = "the AMP path" if inv_scale is not None or found_inf is not None else None
        if len(self._groups(tensors, amp)) > 1:
            norm = self.total_norm(tensors, norm_type)
            self.clip_with_norm_(tensors, max_norm, norm, soft)
            return norm
        return _in_place(tensors, lambda staged: self.ops.clip(
            staged, max_norm, norm_type, False, inv_scale, found_inf, soft)[0])

    def clip_stats_(
        self, tensors: list[Tensor], max_norm: float, norm_type: float, soft: bool,
        per_tensor: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        groups = self._groups(tensors, "per-tensor norms" if per_tensor else None)
        if len(groups) > 1:
            norm = self.total_norm(tensors, norm_type)
            coef = clip_coef(max_norm, norm, soft)
            self.scale_(tensors, coef)
            return norm, coef, None

        def run(staged: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
            norm, coef, per = self.ops.norm(staged, norm_type, max_norm, per_tensor, None, None,
                                            soft)
            self.ops.scale(staged, coef)
            return norm, coef, per if per_tensor else None

        return _in_place(tensors, run)

    def clip_per_tensor_(
        self, tensors: list[Tensor], max_norms: Tensor, norm_type: float, soft: bool = False
    ) -> Tensor:
        """Two passes per device; the norms on ``tensors[0]``'s device, in the tensors' order."""
        self._groups(tensors)
        first = tensors[0].device
        order: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            order.setdefault(t.device, []).append(i)
        per_device = []
        for device, idx in order.items():
            limits = _to_device(max_norms[idx].to(torch.float64).contiguous(), device)
            per = _in_place(
                [tensors[i] for i in idx],
                lambda staged, limits=limits: self.ops.clip_per_tensor(staged, limits, norm_type,
                                                                       soft))
            per_device.append((idx, per))
        if len(per_device) == 1:
            return per_device[0][1]
        # Several devices: concatenated in device order, then put back in the tensors' order by
        # a permutation built on the device (a host index would be a blocking copy).
        merged = torch.cat([per.to(first, non_blocking=True) for _, per in per_device])
        where = _to_device(torch.tensor([i for idx, _ in per_device for i in idx]), first)
        return torch.empty_like(merged).index_copy_(0, where, merged)

    def adaptive_clip_(
        self, grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float,
        norm_type: float,
    ) -> None:
        """One read of the parameters and of the gradients, one write of the units over their
        threshold; non-contiguous tensors go through contiguous copies (gradients written back)."""
        for device in self._groups(grads):
            idx = [i for i, g in enumerate(grads) if g.device == device]
            mine = [grads[i] for i in idx]
            staged = [g if g.is_contiguous() and _values_as_stored(g)
                      else g.resolve_neg().clone(memory_format=torch.contiguous_format)
                      for g in mine]
            theirs = [params[i].detach().to(device).resolve_neg().contiguous() for i in idx]
            self.ops.adaptive_clip(staged, theirs, clip_factor, eps, norm_type)
            for g, s in zip(mine, staged):
                if s is not g:
                    g.copy_(s)

    def clamp_params(self, params: list[Tensor], clip_value: float, *,
                     cuda_only: bool = True) -> bool:
        """``clip_grad_value_`` on the ``.grad``s of ``params`` in one call (read and checked in
        C++, the cached plan, one pass): True, or False for the general path."""
        return self._run_clamp(params, clip_value, cuda_only)

    def clamp_(self, tensors: list[Tensor], clip_value: float) -> None:
        for ts in self._groups(tensors).values():
            _in_place(ts, lambda staged: self.ops.clamp(staged, clip_value))

    def partials_(self, tensors: list[Tensor], norm_type: float, out: Tensor) -> None:
        """Pass 1 without its finish: tensor i's (m, s) partial into ``out[i]`` (fp64 [T, 2] on
        their one device; views with gaps read through a dense copy)."""
        self._groups(tensors, "partials")
        self.ops.partials(dense_staged(tensors)[0], norm_type, out)

    def finish_partials(
        self, partials: Tensor, norm_type: float, max_norm: float,
        inv_scale: Tensor | None = None, found_inf: Tensor | None = None, soft: bool = False,
    ) -> tuple[Tensor, Tensor]:
        return self.ops.finish(partials, norm_type, max_norm, inv_scale, found_inf, soft)
