"""The backends: what each one provides (``Backend``), and where each one lives.

========== ================================ ==========================================
name       module                           runs
========== ================================ ==========================================
``cpp``    ``fusedclip.backends.cpp``       the compiled engine ``fusedclip._C``: CPU
                                            tensors always, CUDA tensors when it was
                                            built with its CUDA kernels
``triton`` ``fusedclip.backends.triton``    Triton kernels: CUDA tensors, or CPU tensors
                                            in Triton's interpreter (``TRITON_INTERPRET=1``)
``reference`` ``fusedclip.backends.reference`` plain PyTorch in fp64 on any device, sparse
                                            and complex gradients too: the oracle
========== ================================ ==========================================

A backend is a module with the members of ``Backend`` below. ``fusedclip._select`` chooses one
for a call; the public functions (``fusedclip.api``) validate their arguments first, so a backend
receives lists of tensors it was chosen for and checked arguments: ``norm_type`` a float p > 0 or
inf, thresholds non-negative floats. Every returned norm is a 0-dim fp64 tensor on the first
tensor's device (converting it to the returned norm's dtype is the caller's business), and nothing
here synchronizes with the device.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from torch import Tensor

__all__ = ["Backend", "BackendStatus"]


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on this machine, on which devices, and why or why not."""

    available: bool
    reason: str
    # The device types it runs tensors on here: () none, None any.
    devices: tuple[str, ...] | None = ()

    def __repr__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.reason}"

    def runs_on(self, device_type: str) -> bool:
        """Whether it runs tensors on devices of ``device_type`` here."""
        return self.available and (self.devices is None or device_type in self.devices)


class Backend(Protocol):
    """The contract every backend module meets (checked by tests/api/test_dispatch.py)."""

    NAME: str

    def status(self) -> BackendStatus:
        """Whether it can run here and on which device types (``devices``); read once per
        process by ``fusedclip._select``."""

    def total_norm(
        self,
        tensors: list[Tensor],
        norm_type: float,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Tensor:
        """The norm of every tensor as if concatenated (fp64, 0-dim). AMP: with ``inv_scale``
        (one fp32 element) the tensors hold loss-scaled values and the result is the norm of
        ``x * inv_scale``; ``found_inf`` (one fp32 element) is set to 1 when any element is inf or
        NaN and left as it is otherwise."""

    def scale_(self, tensors: list[Tensor], coef: Tensor) -> None:
        """``t <- t * coef`` in place (fp64 product, one rounding); no writes when it is 1."""

    def clip_with_norm_(
        self, tensors: list[Tensor], max_norm: float, norm: Tensor, soft: bool = False
    ) -> None:
        """Rescale in place by the clip coefficient of a given total norm."""

    def clip_(
        self,
        tensors: list[Tensor],
        max_norm: float,
        norm_type: float,
        inv_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
        soft: bool = False,
    ) -> Tensor:
        """Global-norm clipping in place; returns the norm before clipping. With ``inv_scale``
        (AMP) the tensors are unscaled and clipped in one multiply."""

    def clip_stats_(
        self, tensors: list[Tensor], max_norm: float, norm_type: float, soft: bool,
        per_tensor: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``clip_`` that also returns what it decided: (norm, fp64 coefficient, fp64 per-tensor
        norms when ``per_tensor``, else None)."""

    def clip_per_tensor_(
        self, tensors: list[Tensor], max_norms: Tensor, norm_type: float, soft: bool = False
    ) -> Tensor:
        """Tensor i scaled by the coefficient of its own norm under ``max_norms[i]`` (fp64, one
        per tensor); returns the fp64 per-tensor norms before clipping."""

    def clamp_params(self, params: list[Tensor], clip_value: float, *,
                     cuda_only: bool = True) -> bool:
        """``clip_grad_value_`` on the ``.grad``s of ``params`` in one call: True when done, False
        when this backend has no such path or some gradient needs the general one."""

    def clamp_(self, tensors: list[Tensor], clip_value: float) -> None:
        """Every element clamped to ``[-clip_value, clip_value]``, bitwise as torch's clamp."""

    def adaptive_clip_(
        self, grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float,
        norm_type: float,
    ) -> None:
        """Adaptive gradient clipping (NFNets), timm's ``adaptive_clip_grad`` semantics."""

    def partials_(self, tensors: list[Tensor], norm_type: float, out: Tensor) -> None:
        """Pass 1 without its finish (``fusedclip.BackwardClipper``'s per-gradient step): tensor
        i's partial (m, s) of its raw elements into ``out[i]`` (fp64 [T, 2], contiguous, on the
        tensors' one device): m = max |x| (NaN once an element is NaN, else inf once one is
        infinite) and sum |x|^p = m^p * s, or (1, the plain sum of |x|^p) where that cannot
        overflow, or (0, 0) for no nonzero element. ``finish_partials`` takes any mix of these."""

    def finish_partials(
        self, partials: Tensor, norm_type: float, max_norm: float,
        inv_scale: Tensor | None = None, found_inf: Tensor | None = None, soft: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """(fp64 norm, fp64 coefficient), both 0-dim on ``partials``' device, of the elements the
        rows of ``partials`` (fp64 [N, 2]) describe, combined in row order; ``inv_scale``,
        ``found_inf`` and ``soft`` as for ``total_norm``/``clip_`` (the coefficient also
        unscales)."""

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
        """``clip_grad_norm_`` on the ``.grad``s of ``params`` in one call, returning the norm in
        its returned dtype; None when this backend has no such path or some gradient needs the
        general one (``cuda_only``: CUDA gradients only)."""

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
        would unscale and clip), gradients untouched; None as for ``clip_params``."""

    def clip_stats_params(
        self, params: list[Tensor], max_norm: float, norm_type: float, *, cuda_only: bool = True,
        soft: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``clip_params`` returning what ``return_stats=True`` reports: (the norm in its returned
        dtype, the fp64 coefficient, the fp64 norm); None as for ``clip_params``."""
