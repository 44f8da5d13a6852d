"""The independent fp64 oracle every backend is held to, the tolerances of the numerics contract
(../shared/DESIGN.md "Contracts"), and the assertions built on them. Nothing here imports
fusedclip: a bug in the package cannot move the expected values.

Contract: a total norm within 1e-5 (relative) of the fp64 norm, read through an fp64 output
(``return_stats``' coefficient, the operators' fp64 norm) so that a 16-bit dtype's rounding of the
returned value does not hide an accumulation error; a clipped element within one rounding of its
dtype of the fp64 result (1e-12 for fp64 gradients, whose coefficient is itself a sum of many
terms).
"""

from __future__ import annotations

import math

import torch

NORM_RTOL = 1e-5

# The integer dtype that holds one element of each size: how tests read and write raw bits.
BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def oracle_norm(tensors: list[torch.Tensor], norm_type: float) -> float:
    """The norm of all tensors concatenated, in fp64 (math.fsum where it matters)."""
    flat = torch.cat([t.detach().to(torch.float64).abs().reshape(-1).cpu() for t in tensors])
    if flat.numel() == 0:
        return 0.0
    if math.isinf(norm_type):
        return float(flat.max())
    if not torch.isfinite(flat).all():
        return float(flat.sum())  # NaN if any NaN, else inf
    peak = float(flat.max())
    if peak == 0:
        return 0.0
    # (|x| / peak)^p as exp(p (log |x| - log peak)): the ratio itself would underflow to 0 for an
    # element 1e-400 times the peak, whose term still counts for a small p.
    nonzero = flat[flat > 0]
    terms = torch.exp(norm_type * (nonzero.log() - math.log(peak)))
    return _times_root(peak, math.fsum(terms.tolist()), norm_type)


def _times_root(peak: float, s: float, p: float) -> float:
    """``peak * s^(1/p)``, in log space where ``s^(1/p)`` alone overflows (p = 0.01 over 2000
    equal elements: ``2000^100``) though the product may not; inf where the product does."""
    try:
        norm = peak * s ** (1.0 / p)
    except OverflowError:
        norm = math.inf
    if math.isinf(norm):
        try:
            norm = math.exp(math.log(peak) + math.log(s) / p)
        except OverflowError:
            norm = math.inf
    return norm


def oracle_norm_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype a returned norm has: the tensors' real dtypes promoted together and with float32
    (so that it holds the fp64 norm to 1e-5; torch's own is the gradients' dtype)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.real.dtype if t.is_complex() else t.dtype)
    return dtype


def oracle_coef(max_norm: float, norm: float, soft: bool = False) -> float:
    """torch's clip coefficient ``min(1, max_norm / (norm + 1e-6))`` (soft: ``max_norm / (norm +
    max_norm)``, 1 for a zero norm or an infinite limit), on Python floats."""
    if math.isnan(norm):
        return math.nan
    if soft:
        return 1.0 if norm == 0 or math.isinf(max_norm) else max_norm / (norm + max_norm)
    coef = max_norm / (norm + 1e-6)  # NaN for inf / inf, as torch's clamp keeps it
    return coef if math.isnan(coef) else min(1.0, coef)


def oracle_clipped(g: torch.Tensor, max_norm: float, norm: float, soft: bool = False
                   ) -> torch.Tensor:
    """``g`` times the coefficient of ``norm``, in fp64, rounded once to ``g``'s dtype."""
    return oracle_scaled(g, oracle_coef(max_norm, norm, soft))


def oracle_scaled(g: torch.Tensor, coef: float) -> torch.Tensor:
    return (g.detach().to(torch.float64) * coef).to(g.dtype)


def oracle_unit_norms(t: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Adaptive clipping's unit norms in fp64, one per row (all dims but the first) of a tensor of
    two or more dims, one for the whole tensor below; shaped to broadcast against ``t``."""
    v = t.detach().to(torch.float64).cpu()
    if v.dim() <= 1:
        return torch.tensor(oracle_norm([v], norm_type), dtype=torch.float64)
    rows = [oracle_norm([row], norm_type) for row in v.flatten(1)]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, *([1] * (v.dim() - 1)))


def oracle_adaptive_clipped(g: torch.Tensor, p: torch.Tensor, clip_factor: float, eps: float,
                            norm_type: float) -> torch.Tensor:
    """timm's adaptive_clip_grad rule in fp64: a unit whose norm reaches ``clip_factor *
    max(param unit norm, eps)`` is scaled to it; the others keep their bits."""
    limit = oracle_unit_norms(p, norm_type).clamp(min=eps) * clip_factor
    norm = oracle_unit_norms(g, norm_type)
    wide = g.detach().to(torch.float64).cpu()
    clipped = (wide * (limit / norm.clamp(min=1e-6))).to(g.dtype)
    return torch.where(norm < limit, g.detach().cpu(), clipped)


# ---- tolerances ----------------------------------------------------------------------------------

def rtol_for(dtype: torch.dtype) -> float:
    """A norm returned in ``dtype``: one rounding of it, and never tighter than 1e-5."""
    return max(torch.finfo(dtype).eps, NORM_RTOL) if dtype in (torch.float16, torch.bfloat16) \
        else NORM_RTOL


def clip_rtol(dtype: torch.dtype) -> float:
    """How far a clipped gradient may be from the oracle, relative: one rounding of its dtype
    (1e-12 for fp64, see the module docstring)."""
    return 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps


def torch_or_skip(call, *args, **kwargs):
    """torch's own function, the comparison's other side; a torch that cannot run it (torch 2.13's
    foreach norm has no sparse kernel) skips the comparison, saying so."""
    import pytest

    try:
        return call(*args, **kwargs)
    except NotImplementedError as exc:
        pytest.skip(f"torch {torch.__version__} cannot run this itself: {str(exc)[:100]}")


# ---- assertions ----------------------------------------------------------------------------------

def assert_norm_close(actual: torch.Tensor | float, expected: float,
                      dtype: torch.dtype = torch.float64) -> None:
    """A norm against an fp64 value within ``rtol_for(dtype)`` (NaN matches NaN): pass an fp64
    output for the 1e-5 contract, or the returned norm's dtype for what a user reads."""
    # (A Python float as an fp64 tensor: as_tensor would make it fp32, inf past 3.4e38.)
    actual = torch.as_tensor(actual, dtype=torch.float64).cpu()
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64),
                               rtol=rtol_for(dtype), atol=0, equal_nan=True)


def ulp_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Element-wise within ``clip_rtol`` (NaN matches NaN)."""
    fi = torch.finfo(actual.dtype)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=clip_rtol(actual.dtype),
                               atol=fi.tiny * fi.eps, equal_nan=True)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a real tensor's elements (so -0.0 differs from 0.0)."""
    return t.detach().contiguous().view(BITS_DTYPE[t.element_size()])


def assert_bitwise_equal(
    actual: list[torch.Tensor], expected: list[torch.Tensor], *, nan_payloads: bool = False
) -> None:
    """Same bits everywhere, signs of zero included: what must not change, did not.

    NaN matches any NaN unless ``nan_payloads``: CPUs keep a NaN operand's payload through
    arithmetic while GPUs produce their canonical NaN, so only a no-op can promise the payload.
    """
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"tensor {i}"
        a, e = a.detach().cpu(), e.detach().cpu()
        same = bits(a) == bits(e)
        if not nan_payloads:
            same |= a.isnan() & e.isnan()
        assert bool(same.all()), f"tensor {i} differs at {int((~same).sum())} elements"
