"""Shared fixtures and helpers: gradient factories, the fp64 oracle, tolerances, markers."""

from __future__ import annotations

import math
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on before
# Triton is first imported: that is how every CI run tests their logic.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedclip  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NORM_TYPES = [1.0, 2.0, math.inf, 0.5, 1.5, 3.0]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def runnable_backends(device: str) -> list[str]:
    """The backends that can run on ``device`` here: what every parity test is parametrized over."""
    status = fusedclip.available_backends()
    names = [n for n in ("cuda", "triton") if status[n].available and device == "cuda"]
    if device == "cpu" and status["triton"].available and fusedclip.triton_backend.interpreting():
        names.append("triton")
    return [*names, "reference"]


def _cpu_backend_params() -> list[str]:
    names = runnable_backends("cpu")
    if fusedclip._extension.loaded():
        names.append("cuda-ops-on-cpu")
    return names


@pytest.fixture(params=_cpu_backend_params())
def cpu_backend(request, monkeypatch) -> str:
    """A backend name for CPU tensors. Besides the backends that run there, "cuda-ops-on-cpu" is the
    ``cuda`` backend made to accept CPU tensors: its operators have CPU implementations with the
    same plan, table and arithmetic as the kernels, so every CPU test also covers the engine."""
    if request.param != "cuda-ops-on-cpu":
        return request.param
    from fusedclip import backends

    monkeypatch.setitem(backends._RUNS_ON, "cuda", None)
    monkeypatch.setitem(
        backends._STATUS, "cuda", lambda: backends.BackendStatus(True, "test: CPU operators")
    )
    backends.backend_status.cache_clear()
    request.addfinalizer(backends.backend_status.cache_clear)
    return "cuda"


# ---- gradients -------------------------------------------------------------------------------

SHAPE_CLASSES: dict[str, list[tuple[int, ...]]] = {
    "single": [(37, 11)],
    "several": [(64, 32), (32,), (7, 3, 5), (1000,)],
    "tiny_and_empty": [(0,), (1,), (3, 0), (1, 1), (5,), (0, 4)],
    "odd_sizes": [(1,), (3,), (17,), (255,), (257,), (4099,), (65537,)],
    "many": [(n % 37,) for n in range(2000)],
}


def make_params(
    shapes, dtype=torch.float32, device="cpu", seed=0, *, layout="contiguous", none_every=0
) -> list[torch.Tensor]:
    """Leaf parameters whose ``.grad`` is random normal (never all zeros).

    layout: "contiguous"; "transposed" (grads are transposes of contiguous storage, so permuted
    strides); "strided" (grads are every-other-column views with gaps); "offset" (grads start one
    element into their storage, so their data pointer is misaligned).
    none_every: every n-th parameter gets no gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if none_every and i % none_every == none_every - 1:
            params.append(p)
            continue
        params.append(p)
        p.grad = _grad_like(p, gen, layout)
    return params


def _grad_like(p: torch.Tensor, gen: torch.Generator, layout: str) -> torch.Tensor:
    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)

    shape = tuple(p.shape)
    if layout == "contiguous" or p.dim() == 0:
        return rand(*shape)
    if layout == "transposed" and p.dim() >= 2:
        return rand(*reversed(shape)).permute(*reversed(range(p.dim())))
    if layout == "strided":
        return rand(*shape[:-1], shape[-1] * 2)[..., ::2]
    if layout == "offset":
        return rand(p.numel() + 1)[1:].view(shape)
    return rand(*shape)


def random_tensors(sizes, dtype, device="cpu", seed=0, scale=1.0) -> list[torch.Tensor]:
    """One random-normal tensor of each size in ``sizes`` (times ``scale``), made in fp64."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
            for n in sizes]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Independent copies with the same gradient values, for running a second implementation."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = p.grad.clone()
        out.append(q)
    return out


def grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


# The integer dtype that holds one element of each size: how tests read and write raw bits.
BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


# ---- the fp64 oracle, independent of fusedclip.reference ---------------------------------------

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
    return peak * math.fsum((flat / peak).pow(norm_type).tolist()) ** (1.0 / norm_type)


def oracle_clipped(g: torch.Tensor, max_norm: float, norm: float) -> torch.Tensor:
    coef = min(1.0, max_norm / (norm + 1e-6)) if not math.isnan(norm) else math.nan
    return (g.detach().to(torch.float64) * coef).to(g.dtype)


def rtol_for(dtype: torch.dtype) -> float:
    """One rounding of ``dtype`` (relative), and never tighter than the 1e-5 norm contract."""
    return max(torch.finfo(dtype).eps, 1e-5) if dtype in (torch.float16, torch.bfloat16) else 1e-5


def clip_rtol(dtype: torch.dtype) -> float:
    """How far a clipped gradient may be from the oracle, relative: one rounding of its dtype.

    fp64 gradients are the exception: their coefficient is itself an fp64 result of summing many
    terms, so they get 1e-12 rather than one ulp.
    """
    return 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps


def assert_norm_close(actual: torch.Tensor, expected: float, dtype=torch.float64) -> None:
    """A returned norm against an fp64 value, within ``rtol_for(dtype)`` (NaN matches NaN)."""
    torch.testing.assert_close(actual.double().cpu(), torch.tensor(expected, dtype=torch.float64),
                               rtol=rtol_for(dtype), atol=0, equal_nan=True)


def assert_clip_matches_reference(clip, tensors, max_norm, norm_dtype=torch.float64) -> None:
    """``clip(tensors)`` (in place, returning the 2-norm) against ``fusedclip.reference.clip_``
    on copies: the norm within ``rtol_for(norm_dtype)``, every element within one rounding."""
    twin = [t.clone() for t in tensors]
    norm = clip(tensors)
    expected = fusedclip.reference.clip_(twin, max_norm, 2.0)
    assert_norm_close(norm, float(expected), norm_dtype)
    for t, e in zip(tensors, twin):
        ulp_close(t, e)


def ulp_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Element-wise within ``clip_rtol`` (NaN matches NaN)."""
    fi = torch.finfo(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=clip_rtol(actual.dtype),
                               atol=fi.tiny * fi.eps, equal_nan=True)


@pytest.fixture(autouse=True)
def _torch_left_unpatched():
    """Tests compare with torch's functions: a test that leaves them patched fails (and they are
    put back), instead of making later tests compare fusedclip with itself."""
    yield
    if fusedclip.is_patched():
        fusedclip.unpatch()
        pytest.fail("the test left torch.nn.utils patched")
