"""``python -m fusedclip check``: which backends run here, and a short self-test of each.

Every backend that can run is checked against an oracle that shares no code with fusedclip's
backends: the fp64 norm of the concatenated gradients, computed with ``torch.linalg.vector_norm``,
and each gradient scaled by the coefficient in fp64, rounded once. Cases cover fp32, bf16, fp16 and
fp64 gradients; the 2-, 1-, inf- and 1.5-norms; hard and soft clipping; empty, one-element, odd,
transposed and misaligned gradients and a few hundred small ones. ``clip_grad_value_`` must give
torch's results bit for bit. Tolerances are the package's contract: the returned norm (float32
or wider) within 1e-5 of the fp64 one, every element within one rounding of its dtype.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import Tensor

from fusedclip import _select, _versions, api
from fusedclip.torch_patch import torch_function

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NORM_TYPES = (2.0, 1.0, math.inf, 1.5)
MODES = ("hard", "soft")


@dataclasses.dataclass
class CheckResult:
    backend: str
    device: str
    available: bool
    reason: str
    cases: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    worst: float = 0.0  # the largest error seen, in units of its tolerance (below 1 passes)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.available and self.cases > 0 and not self.failures


def _gradients(seed: int, dtype: torch.dtype, device: str) -> list[Tensor]:
    """Random gradients of many magnitudes and layouts (never all zeros)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        scale = 10.0 ** (torch.rand((), generator=gen).item() * 4 - 2)
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    grads = [randn(33, 17), randn(4099), randn(1), randn(0), randn(5, 7, 3)]
    grads.append(randn(40, 24).t())  # transposed
    grads.append(randn(1001)[1:])  # starts one element into its storage: misaligned
    grads += [randn(n % 37 + 1) for n in range(120)]
    return [g.to(device) for g in grads]


def _params(grads: list[Tensor]) -> list[Tensor]:
    params = []
    for g in grads:
        p = torch.empty(g.shape, dtype=g.dtype, device=g.device, requires_grad=True)
        p.grad = g
        params.append(p)
    return params


def _oracle(grads: list[Tensor], max_norm: float, norm_type: float, soft: bool):
    flat = torch.cat([g.detach().double().reshape(-1) for g in grads])
    norm = float(torch.linalg.vector_norm(flat, norm_type)) if flat.numel() else 0.0
    coef = max_norm / (norm + max_norm) if soft else min(1.0, max_norm / (norm + 1e-6))
    return norm, [(g.double() * coef).to(g.dtype) for g in grads]


def _error(actual: Tensor, expected: Tensor, rtol: float) -> float:
    """max |a - e| / (rtol |e| + tiny), NaN-aware; below 1 is within tolerance."""
    a, e = actual.double().cpu(), expected.double().cpu()
    if a.numel() == 0:
        return 0.0
    tiny = torch.finfo(actual.dtype).tiny * torch.finfo(actual.dtype).eps
    bad = torch.isnan(a) != torch.isnan(e)
    if bad.any():
        return math.inf
    diff = ((a - e).abs() / (rtol * e.abs() + tiny)).nan_to_num(0.0)
    return float(diff.max())


NORM_RTOL = 1e-5


def _elem_rtol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps


def _norm_case(name: str, result: CheckResult, grads, dtype, norm_type, mode) -> None:
    max_norm = 0.5
    norm_expected, clipped_expected = _oracle(grads, max_norm, norm_type, mode == "soft")
    params = _params([g.clone() for g in grads])
    norm = api.clip_grad_norm_(params, max_norm, norm_type, mode=mode, backend=name)
    # Returned in the gradients' dtypes promoted with float32: never rounded to 16 bits.
    expected = torch.tensor(norm_expected, dtype=torch.float64)
    errors = [_error(norm, expected, NORM_RTOL)]
    if norm.dtype != torch.promote_types(dtype, torch.float32):
        errors.append(math.inf)
    errors += [_error(p.grad, e, _elem_rtol(dtype)) for p, e in zip(params, clipped_expected)]
    _record(result, f"clip_grad_norm_ {dtype} norm_type={norm_type} mode={mode}", max(errors))


def _value_case(name: str, result: CheckResult, grads, dtype) -> None:
    ours, theirs = _params([g.clone() for g in grads]), _params([g.clone() for g in grads])
    bound = float(grads[0].abs().double().median())
    api.clip_grad_value_(ours, bound, backend=name)
    torch_function("clip_grad_value_")(theirs, bound)
    same = all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    _record(result, f"clip_grad_value_ {dtype} (bitwise torch)", 0.0 if same else math.inf)


def _record(result: CheckResult, case: str, error: float) -> None:
    result.cases += 1
    result.worst = max(result.worst, error)
    if not error < 1.0:
        result.failures.append(f"{case}: error {error:.3g} x tolerance")


def _cases():
    """(kind, dtype, norm_type, mode), varying every field from one case to the next so that a
    short time budget still covers every dtype, norm type and mode."""
    combos = [(d, p, m) for p in NORM_TYPES for m in MODES for d in DTYPES]
    # A stride coprime with the 32 combinations walks them all, changing each field every step.
    for i in range(len(combos)):
        dtype, norm_type, mode = combos[(i * 13) % len(combos)]
        yield "norm", dtype, norm_type, mode
        if i % 8 == 0:
            yield "value", DTYPES[(i // 8) % len(DTYPES)], None, None


def _pairs() -> list[tuple[str, str | None]]:
    """(backend, device type) for every device type each backend runs here; (backend, None) for
    a backend that cannot run."""
    pairs: list[tuple[str, str | None]] = []
    for name in _select.BACKEND_NAMES:
        status = _select.backend_status(name)
        devices = [d for d in ("cpu", "cuda") if status.runs_on(d)
                   and (d == "cpu" or torch.cuda.is_available())]
        pairs += [(name, d) for d in devices] or [(name, None)]
    return pairs


def run_check(seconds: float = 10.0) -> list[CheckResult]:
    """Self-tests every backend on every device it runs here, within about ``seconds`` in all."""
    pairs = _pairs()
    runnable = sum(device is not None for _, device in pairs)
    results = []
    for name, device in pairs:
        status = _select.backend_status(name)
        result = CheckResult(name, device or "-", device is not None, status.reason)
        results.append(result)
        if device is None:
            continue
        start = time.perf_counter()
        deadline = start + seconds / runnable
        for i, (kind, dtype, norm_type, mode) in enumerate(_cases()):
            if i and time.perf_counter() > deadline:
                break
            grads = _gradients(i, dtype, device)
            try:
                if kind == "norm":
                    _norm_case(name, result, grads, dtype, norm_type, mode)
                else:
                    _value_case(name, result, grads, dtype)
            except Exception as exc:  # a crash is a failed case, reported with the others
                result.cases += 1
                result.failures.append(f"{kind} {dtype} {norm_type}: {type(exc).__name__}: {exc}")
        result.seconds = time.perf_counter() - start
    return results


def total_cases() -> int:
    return sum(1 for _ in _cases())


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment() -> list[str]:
    """What is installed (fusedclip, Python, torch, Triton, fusedclip._C, the compilers), whether
    CI tests this torch/Triton pair, and for each missing piece how to get it: the lines
    ``python -m fusedclip check`` prints before its self-test."""
    import platform

    import fusedclip
    from fusedclip.backends.cpp import _lib

    triton_version = _triton_version()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    lines = [
        f"fusedclip {fusedclip.__version__}, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({build}), "
        f"Triton {triton_version or 'not installed'}",
    ]
    if not _lib.loaded():
        lines.append(f"fusedclip._C: not built or not loadable ({_lib.LOAD_ERROR})")
    else:
        lines.append("fusedclip._C: the CPU engine" + (" and the CUDA kernels"
                     if _lib.cuda_kernels() else " only (built without its CUDA kernels)"))
    for name, version in _versions.compilers().items():
        lines.append(f"{name}: {version}")
    pair = _versions.tested_pair(torch.__version__, triton_version)
    triton_named = f"Triton {triton_version}" if triton_version else "no Triton"
    if pair:
        lines.append(f"torch {pair.torch} with {triton_named}: a pair CI tests ({pair.what})")
    else:
        tested = "; ".join(f"{p.torch} with {'Triton ' + p.triton if p.triton else 'no Triton'}"
                           for p in _versions.CI_TESTED)
        lines.append(f"torch {torch.__version__} with {triton_named}: not a pair CI tests "
                     f"(CI tests torch {tested}); the self-test below still checks every backend")
    if not _lib.loaded():
        lines.append("to get fusedclip._C: with a C++ compiler (and nvcc for the CUDA kernels), "
                     "pip install --no-build-isolation --no-deps --force-reinstall fusedclip "
                     "(from a checkout: pip install --no-build-isolation -e .); "
                     "FUSEDCLIP_BUILD_EXT=0 installs without it")
    elif torch.cuda.is_available() and not _lib.cuda_kernels():
        lines.append("to get the CUDA kernels: rebuild with nvcc found (CUDA_HOME) and "
                     "FUSEDCLIP_BUILD_EXT=cuda")
    if triton_version is None:
        lines.append("to get the triton backend: pip install triton (on a CUDA machine)")
    return lines
