"""The benchmark's measuring half: time every clipping implementation against torch and a floor.

For each parameter set, dtype and scenario, each implementation ("candidate") clips the same
random-normal gradients. The gradients are restored from a pristine copy before every timed call,
outside the timed region, so every call sees identical data and the "clip" scenario keeps clipping.
The candidates take turns call by call (a rotating order), so that a change in the machine's load
falls on all of them alike; each row reports the median of its calls and their spread, and the run
samples the machine's load (``load.LoadMonitor``) so that the report can say when the numbers are
not to be trusted.

The default run is the headline rows (``HEADLINE_SCENARIOS``, torch against the fused backends,
and the training-step rows of ``train_step``); ``full=True`` is every scenario and every
implementation.

The floor is the time an ideal implementation needs just to move the bytes at the device's copy
bandwidth, measured in the same run: "clip" must read the gradients twice (norm, then scale) and
write them once, "noclip" only reads them once. ``ratio_to_floor`` near 1 means bandwidth-bound.

``run`` is the entry point; ``python -m fusedclip bench`` is its command line; ``report`` prints
and plots what it measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import fusedclip
from fusedclip import _select, api
from fusedclip.tools.bench import report, train_step
from fusedclip.tools.bench.load import LoadMonitor
from fusedclip.tools.bench.sets import BUILTIN_SETS, ParamSet, sets_for_device
from fusedclip.torch_patch import torch_function

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}

# max_norm as a multiple of the gradients' true norm (for the AMP scenarios, of the unscaled one;
# for "per-tensor", of the root-mean-square tensor norm; for "value", the clip value itself, in
# units of the gradients' standard deviation of 1; unused by "agc").
SCENARIOS: dict[str, float] = {
    "clip": 0.1, "noclip": 10.0, "amp": 0.1, "amp-fold": 0.1,
    "soft": 1.0, "stats": 0.1, "per-tensor": 1.0, "value": 1.0, "agc": 0.0,
}

# Gradient bytes an ideal implementation moves, per gradient byte: "clip" reads for the norm, then
# reads and writes to scale; "noclip" reads for the norm and may skip the scale. "amp" unscales,
# checks for inf/NaN and clips GradScaler-scaled gradients (torch's recipe: unscale_ then the
# clip, 5 passes; the floor is 3); "amp-fold" leaves the multiply to a fused optimizer's step
# (not timed), so it only has to read the gradients once.
#
# The other modes: "soft" and "stats" clip as "clip" does (3); "per-tensor" clips each
# tensor to its own threshold in the same two passes (3); "value" clamps every element in one
# read and write (2; torch's foreach path makes 4: clamp_min, then clamp_max); "agc" reads the
# parameters and the gradients and writes the gradients (3, parameters and gradients of one dtype).
FLOOR_PASSES: dict[str, int] = {
    "clip": 3, "noclip": 1, "amp": 3, "amp-fold": 1,
    "soft": 3, "stats": 3, "per-tensor": 3, "value": 2, "agc": 3,
}
AMP_SCENARIOS = ("amp", "amp-fold")
MODE_SCENARIOS = ("soft", "stats", "per-tensor", "value", "agc")
HEADLINE_SCENARIOS = ("clip", "noclip", "amp", "amp-fold")
DEFAULT_SCENARIOS = (*HEADLINE_SCENARIOS, *MODE_SCENARIOS)
# The loss scale the AMP scenarios' gradients carry (GradScaler's default initial scale).
AMP_SCALE = 2.0**16

BASELINE = "torch"
# Short names (the table fits 80 columns), and what each one is.
IMPLEMENTATIONS = {
    "torch": "torch.nn.utils, foreach=True (torch's default)",
    "torch-loop": "torch.nn.utils, foreach=False",
    "ref": "fusedclip, backend='reference' (fp64 PyTorch)",
    "cpp": "fusedclip, backend='cpp' (the compiled engine)",
    "triton": "fusedclip, backend='triton'",
}
DEFAULT_ITERS = 20
DEFAULT_WARMUP = 3
# A row whose calls spread more than this ((p75 - p25) / median) is marked noisy.
NOISY_SPREAD = 0.15
TRAIN_STEPS = 40  # timed steps per variant in the default run's training-step rows
L2_FLUSH_BYTES = 256 << 20
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}
COPY_ITERS = 10

CPU_NOTE = (
    "CPU numbers, not GPU numbers: no CUDA device was used, so these are the scaled-down CPU sets "
    "timed on the host; they say nothing about the CUDA or Triton kernels."
)

ClipFn = Callable[[list[Tensor], float], Tensor]
# amp(params, max_norm, scaler, optimizer, fold) -> the unscaled norm
AmpFn = Callable[[list[Tensor], float, torch.amp.GradScaler, torch.optim.Optimizer, bool], Tensor]


# mode(params, threshold) -> the norm the call reports, or None
ModeFn = Callable[[list[Tensor], float], Tensor | None]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One implementation under test: ``clip(params, max_norm)`` clips in place; ``amp`` unscales
    and clips GradScaler-scaled gradients (folding the multiply into the optimizer when asked and
    able to); ``modes`` runs the other clipping modes (``MODE_SCENARIOS``)."""

    name: str
    clip: ClipFn
    amp: AmpFn | None = None
    modes: Mapping[str, ModeFn] = dataclasses.field(default_factory=dict)


def _torch_modes(foreach: bool) -> dict[str, ModeFn]:
    """The unfused torch equivalent of every mode: what a user writes without fusedclip."""

    def soft(params, max_norm):
        grads = [p.grad for p in params]
        norm = torch_function("get_total_norm")(grads, foreach=foreach)
        coef = max_norm / (norm + max_norm)
        if foreach:
            torch._foreach_mul_(grads, coef)
        else:
            for g in grads:
                g.mul_(coef)
        return norm

    def per_tensor(params, max_norm):
        grads = [p.grad for p in params]
        norms = (torch._foreach_norm(grads) if foreach else [g.norm() for g in grads])
        coefs = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
        if foreach:
            torch._foreach_mul_(grads, coefs)
        else:
            for g, c in zip(grads, coefs):
                g.mul_(c)
        return None

    def agc(params, _):
        for p in params:
            dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
            keep = dims is not None
            limit = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=keep).clamp(min=1e-3)
            g = p.grad
            norm = torch.linalg.vector_norm(g, dim=dims, keepdim=keep)
            g.copy_(torch.where(norm < limit * 0.01, g, g * (limit * 0.01 / norm.clamp(min=1e-6))))
        return None

    return {
        "soft": soft,
        "stats": lambda params, max_norm: torch_function("clip_grad_norm_")(params, max_norm,
                                                                          foreach=foreach),
        "per-tensor": per_tensor,
        "value": lambda params, v: torch_function("clip_grad_value_")(params, v, foreach=foreach),
        "agc": agc,
    }


def _none(_: object) -> None:
    """Per-tensor norms are no single norm to report."""
    return None


def _fusedclip_modes(backend: str) -> dict[str, ModeFn]:
    return {
        "soft": lambda ps, m: api.clip_grad_norm_(ps, m, mode="soft", backend=backend),
        "stats": lambda ps, m: api.clip_grad_norm_(ps, m, return_stats=True,
                                                   backend=backend).total_norm,
        "per-tensor": lambda ps, m: _none(api.clip_grad_norm_per_tensor_(ps, m, backend=backend)),
        "value": lambda ps, v: api.clip_grad_value_(ps, v, backend=backend),
        "agc": lambda ps, _: api.adaptive_clip_grad_(ps, backend=backend),
    }


def _torch_clip(foreach: bool) -> ClipFn:
    return functools.partial(torch_function("clip_grad_norm_"), foreach=foreach)


def _torch_amp(foreach: bool) -> AmpFn:
    def amp(params, max_norm, scaler, optimizer, fold):
        # torch has no fold: its recipe is the same whatever the optimizer.
        scaler.unscale_(optimizer)
        return torch_function("clip_grad_norm_")(params, max_norm, foreach=foreach)

    return amp


def _fusedclip_clip(backend: str) -> ClipFn:
    return functools.partial(api.clip_grad_norm_, backend=backend)


def _fusedclip_amp(backend: str) -> AmpFn:
    def amp(params, max_norm, scaler, optimizer, fold):
        return api.clip_grad_norm_(params, max_norm, scaler=scaler, optimizer=optimizer,
                                   fold_into_optimizer=fold, backend=backend)

    return amp


def _candidate(name: str, backend_or_foreach: str | bool) -> Candidate:
    if isinstance(backend_or_foreach, bool):
        return Candidate(name, _torch_clip(backend_or_foreach), _torch_amp(backend_or_foreach),
                         _torch_modes(backend_or_foreach))
    return Candidate(name, _fusedclip_clip(backend_or_foreach),
                     _fusedclip_amp(backend_or_foreach), _fusedclip_modes(backend_or_foreach))


# The fp64 reference on the CPU takes about a second per call on 64M elements: past this many it is
# left out of CPU runs (said in the skipped list), and timed on the smaller sets.
CPU_REFERENCE_MAX_NUMEL = 1 << 24


def _runs_set(chosen: list[Candidate], param_set: ParamSet, device: torch.device,
              skipped: list[dict[str, str]] | None = None) -> list[Candidate]:
    """The candidates timed on ``param_set`` (appending to ``skipped`` the ones that are not)."""
    if (device.type == "cuda" or param_set.numel() <= CPU_REFERENCE_MAX_NUMEL
            or all(c.name != "ref" for c in chosen)):
        return chosen
    if skipped is not None:
        reason = (f"not timed on {param_set.name} ({param_set.numel():,} elements): the fp64 "
                  "reference takes about a second per call there on the CPU")
        skipped.append({"implementation": "ref", "reason": reason})
    return [c for c in chosen if c.name != "ref"]


def candidates(device: torch.device, full: bool = True
               ) -> tuple[list[Candidate], list[dict[str, str]]]:
    """The candidates that can run on ``device`` (without ``full``: torch and the fused
    backends), and a skip reason for each one that cannot."""
    chosen = [_candidate("torch", True)]
    if full:
        chosen += [_candidate("torch-loop", False), _candidate("ref", "reference")]
    skipped = []
    for backend in ("cpp", "triton"):
        name = backend
        status = _select.backend_status(backend)
        if backend == "triton" and device.type == "cpu":
            # Triton's interpreter runs the kernels one program at a time in Python: a test tool.
            skipped.append({"implementation": name, "reason": "runs CUDA tensors (on the CPU "
                            "only in Triton's interpreter, which is not worth timing)"})
        elif not status.runs_on(device.type):
            skipped.append({"implementation": name, "reason": status.reason})
        else:
            chosen.append(_candidate(name, backend))
    return chosen, skipped


@dataclasses.dataclass
class Workload:
    """Parameters of one set and dtype with random-normal gradients, and a pristine copy of them."""

    params: list[Tensor]
    pristine: list[Tensor]
    norm: float
    _amp: tuple[torch.amp.GradScaler, torch.optim.Optimizer] | None = None

    @classmethod
    def create(
        cls, param_set: ParamSet, dtype: torch.dtype, device: torch.device, seed: int = 0
    ) -> Workload:
        gen = torch.Generator(device=device).manual_seed(seed)
        params = []
        for shape in param_set.shapes():
            # Random values: adaptive clipping ("agc") reads the parameters.
            param = torch.nn.Parameter(
                torch.randn(shape, dtype=dtype, device=device, generator=gen))
            param.grad = torch.randn(shape, dtype=dtype, device=device, generator=gen)
            params.append(param)
        grads = [p.grad for p in params]
        # In fp64, not rounded to the gradients' dtype: max_norm is exactly 0.1x or 10x.
        norm = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])))
        return cls(params, [g.clone() for g in grads], norm)

    @property
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]

    def restore(self) -> None:
        """Put the pristine gradients back (a previous clip has scaled them)."""
        torch._foreach_copy_(self.grads, self.pristine)

    def amp_state(self) -> tuple[torch.amp.GradScaler, torch.optim.Optimizer]:
        """A GradScaler at ``AMP_SCALE`` and a fused AdamW over the parameters (never stepped),
        with the scaler's per-optimizer state reset as ``scaler.update()`` resets it, so the
        next call may unscale. The gradients stand for scaled ones: their norm is ``norm``, the
        unscaled norm ``norm / AMP_SCALE``."""
        if self._amp is None:
            device = self.params[0].device
            scaler = torch.amp.GradScaler(device.type, init_scale=AMP_SCALE)
            scaler.scale(torch.ones((), device=device))  # creates the scale tensor
            self._amp = scaler, torch.optim.AdamW(self.params, fused=True)
        scaler, optimizer = self._amp
        scaler._per_optimizer_states.clear()
        return scaler, optimizer

    def call(self, candidate: Candidate, scenario: str, max_norm: float) -> Tensor | None:
        """One call of ``candidate`` in ``scenario``."""
        if scenario in MODE_SCENARIOS:
            return candidate.modes[scenario](self.params, max_norm)
        if scenario not in AMP_SCENARIOS:
            return candidate.clip(self.params, max_norm)
        scaler, optimizer = self.amp_state()
        return candidate.amp(self.params, max_norm, scaler, optimizer, scenario == "amp-fold")

    def true_norm(self, scenario: str) -> float:
        return self.norm / AMP_SCALE if scenario in AMP_SCENARIOS else self.norm

    def threshold(self, scenario: str) -> float:
        """The max_norm (or clip value) of ``scenario`` (see ``SCENARIOS``)."""
        if scenario == "value":
            return SCENARIOS[scenario]
        if scenario == "per-tensor":
            return SCENARIOS[scenario] * self.norm / math.sqrt(len(self.params))
        return SCENARIOS[scenario] * self.true_norm(scenario)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median and minimum device time in ms, median host time of the call in µs, and the spread
    of the device times: (p75 - p25) / median."""

    ms_median: float
    ms_min: float
    host_us: float
    spread: float = 0.0


def _spread(values: Sequence[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def _l2_flusher(device: torch.device) -> Callable[[], None]:
    """A function that evicts the GPU's L2 cache by writing a buffer larger than it."""
    if device.type != "cuda":
        return lambda: None
    scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return functools.partial(scratch.fill_, 0)


def time_calls(
    call: Callable[[], object],
    *,
    prepare: Callable[[], None],
    iters: int,
    warmup: int,
    device: torch.device,
) -> Timing:
    """Time ``call`` ``iters`` times after ``warmup`` untimed runs; ``prepare`` runs before each.

    ``prepare`` (restoring gradients, flushing caches) is outside the timed region. On CUDA the
    device time comes from events around the call after a synchronize, and the host time is the
    launch cost alone; on the CPU both are the wall time of the call.
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    cuda = device.type == "cuda"
    events = []
    device_ms, host_us = [], []
    for i in range(warmup + iters):
        prepare()
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        call()
        host = time.perf_counter() - t0
        if cuda:
            end.record()
        if i < warmup:
            continue
        host_us.append(host * 1e6)
        if cuda:
            events.append((start, end))
        else:
            device_ms.append(host * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
        device_ms = [start.elapsed_time(end) for start, end in events]
    return Timing(statistics.median(device_ms), min(device_ms), statistics.median(host_us),
                  _spread(device_ms))


def time_interleaved(
    calls: Sequence[tuple[str, Callable[[], object]]],
    *,
    prepare: Callable[[], None],
    iters: int,
    warmup: int,
    device: torch.device,
) -> dict[str, Timing]:
    """``time_calls`` of several calls taking turns: round k runs each once, in an order rotated
    by k, so that no call always follows the same one and a change in the machine's load falls
    on all of them alike. ``prepare`` runs before every call, untimed."""
    names = [name for name, _ in calls]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for k in range(warmup + iters):
        order = calls[k % len(calls):] + calls[:k % len(calls)]
        for name, call in order:
            t = time_calls(call, prepare=prepare, iters=1, warmup=0, device=device)
            if k >= warmup:
                times[name].append((t.ms_median, t.host_us))
    out = {}
    for name in names:
        ms = [m for m, _ in times[name]]
        out[name] = Timing(statistics.median(ms), min(ms),
                           statistics.median(h for _, h in times[name]), _spread(ms))
    return out


def copy_bandwidth(device: torch.device, iters: int = COPY_ITERS) -> float:
    """The device's copy bandwidth in bytes/s: ``dst.copy_(src)`` reads and writes each byte."""
    nbytes = COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]
    seconds = _time_copy(nbytes, device, iters)
    _free(device)  # the buffers are gone; give their memory back before the sets need it
    return 2 * nbytes / seconds


def _time_copy(nbytes: int, device: torch.device, iters: int) -> float:
    """Median seconds of one ``nbytes`` device-to-device copy."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_calls(
        lambda: dst.copy_(src),
        prepare=_l2_flusher(device),
        iters=iters,
        warmup=2,
        device=device,
    )
    return timing.ms_median / 1e3


def measure(
    candidates: Sequence[Candidate],
    workload: Workload,
    max_norm: float,
    *,
    iters: int,
    warmup: int,
    device: torch.device,
    flush: Callable[[], None] | None = None,
    scenario: str = "clip",
) -> dict[str, tuple[Timing, float] | Exception]:
    """Time the candidates on one workload, interleaved; for each, its timing and the norm it
    reported, or the exception its first call raised (it is then not timed)."""
    flush = flush or (lambda: None)

    def prepare() -> None:
        workload.restore()
        flush()

    outcome: dict[str, tuple[Timing, float] | Exception] = {}
    calls = []
    for cand in candidates:
        prepare()
        try:
            result = workload.call(cand, scenario, max_norm)
        except Exception as exc:  # a broken backend must not hide the other results
            outcome[cand.name] = exc
            continue
        outcome[cand.name] = (None, math.nan if result is None else float(result))
        calls.append((cand.name, functools.partial(workload.call, cand, scenario, max_norm)))
    timings = time_interleaved(calls, prepare=prepare, iters=iters, warmup=warmup, device=device)
    for name, timing in timings.items():
        outcome[name] = (timing, outcome[name][1])
    return outcome


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _numbers(
    workload: Workload,
    scenario: str,
    max_norm: float,
    timing: Timing,
    reported_norm: float,
    bandwidth: float,
) -> dict[str, Any]:
    """A row's measurements and what follows from them (the floor, GB/s, the ratio)."""
    grad_bytes = sum(g.numel() * g.element_size() for g in workload.grads)
    floor_bytes = FLOOR_PASSES[scenario] * grad_bytes
    floor_ms = floor_bytes / bandwidth * 1e3
    return {
        "tensors": len(workload.params),
        "numel": sum(g.numel() for g in workload.grads),
        "grad_bytes": grad_bytes,
        "floor_bytes": floor_bytes,
        "floor_ms": floor_ms,
        "ms_median": timing.ms_median,
        "ms_min": timing.ms_min,
        "spread": timing.spread,
        "host_us": timing.host_us,
        "gbps": floor_bytes / (timing.ms_median / 1e3) / 1e9,
        "ratio_to_floor": timing.ms_median / floor_ms,
        "speedup_vs_torch": None,
        "noisy": timing.spread > NOISY_SPREAD,
        "true_norm": workload.true_norm(scenario),
        "reported_norm": reported_norm,
        "max_norm": max_norm,
    }


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What every measurement in one run shares."""

    device: torch.device
    iters: int
    warmup: int
    bandwidth: float  # bytes/s
    flush: Callable[[], None]


def _bench_rows(
    candidates: Sequence[Candidate], workload: Workload, scenario: str, settings: _Settings,
    key: dict[str, str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, errors) of one (set, dtype, scenario): the candidates timed together."""
    max_norm = workload.threshold(scenario)
    outcome = measure(candidates, workload, max_norm, iters=settings.iters,
                      warmup=settings.warmup, device=settings.device, flush=settings.flush,
                      scenario=scenario)
    rows, errors = [], []
    for cand in candidates:
        got = outcome[cand.name]
        head = {**key, "scenario": scenario, "implementation": cand.name}
        if isinstance(got, Exception):
            errors.append({**head, "error": f"{type(got).__name__}: {got}"})
        else:
            rows.append({**head, **_numbers(workload, scenario, max_norm, *got,
                                            settings.bandwidth)})
    return rows, errors


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_torch`` within each (set, dtype, scenario) group; a row is noisy when it
    or its baseline is."""
    baseline = {(r["set"], r["dtype"], r["scenario"]): r for r in rows
                if r["implementation"] == BASELINE}
    for r in rows:
        base = baseline.get((r["set"], r["dtype"], r["scenario"]))
        r["speedup_vs_torch"] = None if base is None else base["ms_median"] / r["ms_median"]
        r["noisy"] = r["noisy"] or (base is not None and base["noisy"])


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA when present, else the CPU; an unusable CUDA request is an error."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"the benchmark runs on 'cuda' or 'cpu', not {device.type!r}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_sets(
    sets: Iterable[str | ParamSet] | None,
    device: torch.device,
    registry: Mapping[str, ParamSet] | None = None,
) -> list[ParamSet]:
    """Set objects from names (looked up in ``registry``) or objects; ``None`` is the defaults."""
    registry = BUILTIN_SETS if registry is None else registry
    if sets is None:
        return sets_for_device(registry, device.type)
    resolved = []
    for s in sets:
        if isinstance(s, ParamSet):
            resolved.append(s)
        elif s in registry:
            resolved.append(registry[s])
        else:
            raise ValueError(f"unknown set {s!r}; known sets: {', '.join(registry)}")
    return resolved


def _check_choices(values: Sequence[str], known: Mapping[str, Any], what: str) -> None:
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(device: torch.device, bandwidth: float, iters: int, warmup: int,
             full: bool = True) -> dict[str, Any]:
    """What the numbers depend on (no host name)."""
    cpu = device.type != "cuda"
    return {
        "device": _device_name(device),
        "device_type": device.type,
        "cpu_numbers": cpu,
        "note": CPU_NOTE if cpu else "GPU numbers",
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "triton_version": _package_version("triton"),
        "fusedclip_version": fusedclip.__version__,
        "python_version": platform.python_version(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "iters": iters,
        "warmup": warmup,
        "full": full,
        "noisy_spread": NOISY_SPREAD,
        "floor_passes": FLOOR_PASSES,
        "max_norm_factor": SCENARIOS,
        "baseline": BASELINE,
        "implementations": IMPLEMENTATIONS,
        "backends": {
            name: {"available": s.available, "reason": s.reason}
            for name, s in _select.available_backends().items()
        },
    }


def _progress(console: Any, enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


# What a call costs besides moving its floor's bytes (restoring the gradients is two more passes),
# per tensor: the estimate of a run before it starts, from the measured copy bandwidth.
_RESTORE_PASSES = 2
_HOST_S_PER_TENSOR = {"cpu": 6e-6, "cuda": 8e-6}
_HOST_S_PER_CALL = 3e-4
_CPU_TRAIN_STEP_S = 0.045  # llama-tiny / gpt2-tiny with fused AdamW on 2 cores (measured)


def estimate_seconds(param_sets: Sequence[ParamSet], dtypes: Sequence[str],
                     scenarios: Sequence[str], runs: Mapping[str, list[Candidate]],
                     iters: int, warmup: int, bandwidth: float, device: torch.device,
                     train_steps: int) -> float:
    """About how long the run takes, from the copy bandwidth measured first (not a promise)."""
    total = 0.0
    calls = iters + warmup + 1
    per_tensor = _HOST_S_PER_TENSOR["cuda" if device.type == "cuda" else "cpu"]
    for param_set in param_sets:
        tensors = param_set.num_tensors()
        for dtype in dtypes:
            nbytes = param_set.numel() * DTYPES[dtype].itemsize
            total += 3 * nbytes / bandwidth  # making the gradients and their pristine copy
            for scenario in scenarios:
                passes = FLOOR_PASSES[scenario] + _RESTORE_PASSES
                one = passes * nbytes / bandwidth + tensors * per_tensor + _HOST_S_PER_CALL
                total += calls * len(runs[param_set.name]) * one
    if train_steps and device.type == "cpu":
        total += (train_steps + 3) * len(train_step.VARIANTS) * len(train_step.MODELS) * \
            _CPU_TRAIN_STEP_S
    return total


class _Lines:
    """Progress as one line per finished set when the output is not a terminal (a log, CI)."""

    def __init__(self, total_s: float, count: int, enabled: bool, stream=None) -> None:
        self.total_s, self.count, self.enabled = total_s, count, enabled
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.done = 0

    def finished(self, what: str, part_s: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        left = max(0.0, self.total_s - elapsed) if self.done < self.count else 0.0
        print(f"[{self.done}/{self.count}] {what} done in {part_s:.1f} s; {elapsed:.0f} s "
              f"elapsed, about {left:.0f} s left", file=self.stream, flush=True)


def run(
    sets: Iterable[str | ParamSet] | None = None,
    dtypes: Sequence[str] = ("bf16", "fp32"),
    scenarios: Sequence[str] | None = None,
    iters: int = DEFAULT_ITERS,
    warmup: int = DEFAULT_WARMUP,
    device: str | torch.device | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    full: bool = False,
    train_steps: int | None = None,
    json_name: str = "results.json",
    registry: Mapping[str, ParamSet] | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Benchmark the candidates; returns ``{"metadata", "rows", "skipped", "errors",
    "train_step", "load"}``.

    Without ``full``: the headline rows (``HEADLINE_SCENARIOS``, torch against the fused
    backends) and ``train_steps`` (default ``TRAIN_STEPS``; 0: none) training steps of each
    ``train_step`` variant; with ``full``: every scenario and implementation, and training steps
    only when asked for. With ``out_dir`` the results are also written there as ``json_name`` and
    a PNG plot of the same stem. The table is printed to ``console`` (a ``rich.console.Console``;
    stdout by default), progress to stderr (a bar in a terminal, else a line per finished set).
    Without CUDA (or with ``device="cpu"``) the default sets are the CPU-sized ones and the
    results are marked ``cpu_numbers``.
    """
    console = console or report.default_console()
    device = resolve_device(device)
    param_sets = resolve_sets(sets, device, registry)
    if scenarios is None:
        scenarios = DEFAULT_SCENARIOS if full else HEADLINE_SCENARIOS
    if train_steps is None:
        train_steps = 0 if full or sets is not None else TRAIN_STEPS
    _check_choices(dtypes, DTYPES, "dtype")
    _check_choices(scenarios, SCENARIOS, "scenario")
    if not (param_sets and dtypes and scenarios):
        raise ValueError("nothing to run: give at least one set, dtype and scenario")
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {iters} and {warmup}")
    chosen, skipped = candidates(device, full)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    load = LoadMonitor()
    load.sample()

    runs = {p.name: _runs_set(chosen, p, device, skipped) for p in param_sets}
    total = len(dtypes) * len(scenarios) * len(param_sets)
    bandwidth = copy_bandwidth(device)
    settings = _Settings(device, iters, warmup, bandwidth, _l2_flusher(device))
    estimate = estimate_seconds(param_sets, dtypes, scenarios, runs, iters, warmup, bandwidth,
                                device, train_steps)
    print(f"fusedclip bench: {total} rows on {_device_name(device)}"
          f"{' plus training steps' if train_steps else ''}; estimated {estimate:.0f} s "
          f"(copy bandwidth {bandwidth / 1e9:.1f} GB/s)", file=sys.stderr, flush=True)
    terminal = progress and console.is_terminal
    lines = _Lines(estimate, len(param_sets) + bool(train_steps), progress and not terminal)
    with _progress(console, terminal) as bar:
        task = bar.add_task("measuring", total=total)
        for param_set in param_sets:
            set_start = time.monotonic()
            for dtype_name in dtypes:
                bar.update(task, description=f"{param_set.name} {dtype_name}: making gradients")
                workload = Workload.create(param_set, DTYPES[dtype_name], device)
                for scenario in scenarios:
                    bar.update(task, description=f"{param_set.name} {dtype_name} {scenario}")
                    got, failed = _bench_rows(runs[param_set.name], workload, scenario, settings,
                                              {"set": param_set.name, "dtype": dtype_name})
                    rows += got
                    errors += failed
                    load.sample()
                    bar.advance(task)
                del workload
                _free(device)
            lines.finished(param_set.name, time.monotonic() - set_start)
    _add_speedups(rows)
    steps: list[dict[str, Any]] = []
    if train_steps:
        start = time.monotonic()
        steps = train_step.as_records(train_step.run_train_steps(
            device=str(device), steps=train_steps, progress=lambda _: load.sample()))
        lines.finished("training steps", time.monotonic() - start)
    load.sample()

    results = {
        "metadata": metadata(device, settings.bandwidth, iters, warmup, full),
        "rows": rows,
        "skipped": skipped,
        "errors": errors,
        "train_step": steps,
        "load": load.as_dict(),
    }
    report.print_table(results, console)
    if out_dir is not None:
        json_path, png_path = report.write_results(results, Path(out_dir), json_name)
        console.print(f"wrote {json_path} and {png_path}")
    return results
