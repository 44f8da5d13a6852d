"""Smoke tests of the benchmark harness (``fusedclip.tools.bench``: ``measure``, ``report``,
``sets``; the CLI).

Everything runs on the CPU with tiny sets and a couple of iterations; the timings are not checked,
only that the machinery produces them in the promised form (and that the fusedclip rows report
the norm they clipped with).
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import fusedclip
from fusedclip import _select
from fusedclip.tools.bench import load, measure, report, train_step
from fusedclip.tools.bench.sets import (
    BUILTIN_SETS,
    CPU_SETS,
    DEFAULT_SETS,
    ParamSet,
    load_sets,
    many_small,
    parse_sets,
)
from fusedclip.tools.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
TINY = ParamSet.of("tiny", "shapes", shapes=[[64, 32], [32], [7], [3, 5, 2]])
FEW_SMALL = ParamSet.of("few-small", "many_small", n=20, max_numel=300)
_CPP_ON_CPU = _select.backend_status("cpp").runs_on("cpu")

TOML = """
[mini-llama]
kind = "llama_like"
hidden = 32
layers = 2
vocab = 100
intermediate = 64
heads = 4
kv_heads = 2

[listed]
kind = "shapes"
shapes = [[8, 4], [4]]
default_on = "any"
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """One full CPU run (every scenario and implementation) on two tiny sets, both dtypes."""
    out = tmp_path_factory.mktemp("bench")
    console = Console(file=io.StringIO(), width=80)
    res = measure.run(
        sets=[TINY, FEW_SMALL],
        iters=4,
        warmup=1,
        device="cpu",
        out_dir=out,
        progress=False,
        full=True,
        console=console,
    )
    return res, out, console.file.getvalue()


def test_run_writes_json_with_metadata_and_rows(results: tuple[dict, Path, str]) -> None:
    res, out, _ = results
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) == {"metadata", "rows", "skipped", "errors", "train_step", "load"}
    assert on_disk["train_step"] == []  # --full runs none unless asked
    load = on_disk["load"]
    assert load["cores"] >= 1 and isinstance(load["busy"], list)
    if load["readable"]:  # Linux: before the run and after every (set, dtype, scenario)
        assert len(load["samples"]) >= 1 + 2 * 2 * len(measure.SCENARIOS)
        assert {"t_s", "load1", "others_running"} <= set(load["samples"][0])
    meta = on_disk["metadata"]
    for key in (
        "device",
        "torch_version",
        "triton_version",
        "fusedclip_version",
        "cuda_version",
        "timestamp_utc",
        "copy_bandwidth_gbps",
        "cpu_numbers",
    ):
        assert key in meta
    assert meta["cpu_numbers"] is True
    assert meta["copy_bandwidth_gbps"] > 0
    assert set(meta["backends"]) == set(_select.BACKEND_NAMES)
    for name, status in fusedclip.available_backends().items():
        assert meta["backends"][name] == {"available": status.available, "reason": status.reason}
    assert on_disk["errors"] == []
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))
    assert on_disk["skipped"] == res["skipped"]


def test_rows_cover_every_case_with_positive_ratios(results: tuple[dict, Path, str]) -> None:
    rows = results[0]["rows"]
    impls = {r["implementation"] for r in rows}
    assert {"torch", "torch-loop", "ref"} <= impls
    assert ("cpp" in impls) == _CPP_ON_CPU
    assert "triton" not in impls
    # sets x dtypes x scenarios x implementations
    assert len(rows) == 2 * 2 * len(measure.SCENARIOS) * len(impls)
    for r in rows:
        assert r["ratio_to_floor"] > 0
        assert r["gbps"] > 0
        assert r["ms_min"] <= r["ms_median"]
        assert r["speedup_vs_torch"] > 0
        assert r["spread"] >= 0 and r["noisy"] == (r["spread"] > measure.NOISY_SPREAD) or \
            r["noisy"]  # (or its baseline's row is noisy)
        passes = measure.FLOOR_PASSES[r["scenario"]]
        assert r["floor_bytes"] == passes * r["grad_bytes"]


@pytest.mark.parametrize("impl", ["ref", "cpp"])
def test_fusedclip_rows_report_the_true_norm(results: tuple[dict, Path, str], impl: str) -> None:
    if impl == "cpp" and not _CPP_ON_CPU:
        pytest.skip(f"cpp on cpu: {_select.backend_status('cpp').reason}")
    rows = [r for r in results[0]["rows"] if r["implementation"] == impl]
    assert len(rows) == 2 * 2 * len(measure.SCENARIOS)
    for r in rows:
        if r["scenario"] in ("per-tensor", "value", "agc"):  # no global norm to report
            assert math.isnan(r["reported_norm"])
            continue
        assert r["reported_norm"] == pytest.approx(r["true_norm"], rel=1e-2)  # bf16 rounding


def test_png_and_table_say_cpu(results: tuple[dict, Path, str]) -> None:
    _, out, printed = results
    png = out / "results.png"
    assert png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CPU NUMBERS, NOT GPU NUMBERS" in printed
    assert "backend='reference'" in printed  # the legend of the short names
    assert ("backend='cpp'" in printed) == _CPP_ON_CPU
    assert "skipped triton: runs CUDA tensors" in printed


def test_table_fits_80_columns_with_unique_names(results: tuple[dict, Path, str]) -> None:
    printed = results[2]
    assert max(map(len, printed.splitlines())) <= 80
    names = {r["implementation"] for r in results[0]["rows"]}
    assert all(len(n) <= 10 for n in names)
    assert not any(a != b and a.startswith(b) for a in names for b in names if len(b) < 5)


def test_report_renders_the_saved_results(results: tuple[dict, Path, str], tmp_path: Path) -> None:
    """``report`` works from results.json alone: the table and the plot of a saved run."""
    _, out, printed = results
    saved = json.loads((out / "results.json").read_text())
    console = Console(file=io.StringIO(), width=80)
    report.print_table(saved, console)
    assert console.file.getvalue() in printed  # the table run() printed, then its file names
    report.plot(saved, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_candidates_and_skips() -> None:
    """On the CPU: torch, the reference and (when built) the C++ engine run; Triton is skipped
    with its reason (its interpreter is a test tool, not worth timing)."""
    chosen, skipped = measure.candidates(CPU)
    names = [c.name for c in chosen]
    assert names[:3] == ["torch", "torch-loop", "ref"]
    assert ("cpp" in names) == _CPP_ON_CPU
    reasons = {s["implementation"]: s["reason"] for s in skipped}
    assert "triton" not in names
    assert "Triton's interpreter" in reasons["triton"]
    if _CPP_ON_CPU:
        assert set(reasons) == {"triton"}
    else:
        assert reasons["cpp"] == _select.backend_status("cpp").reason
    headline, _ = measure.candidates(CPU, full=False)
    assert [c.name for c in headline] == ["torch", "cpp"][:1 + _CPP_ON_CPU]


def test_restore_before_each_timed_call_keeps_clipping_active() -> None:
    """Every call, timed or warmup, starts from the pristine gradients, and each one clips."""
    workload = measure.Workload.create(FEW_SMALL, torch.float32, CPU)
    max_norm = measure.SCENARIOS["clip"] * workload.norm
    seen_pristine, seen_norms = [], []

    def spy(params: list[torch.Tensor], limit: float) -> torch.Tensor:
        grads = [p.grad for p in params]
        seen_pristine.append(all(map(torch.equal, grads, workload.pristine)))
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        seen_norms.append(float(norm))
        return norm

    measure.measure(
        [measure.Candidate("spy", spy)], workload, max_norm, iters=3, warmup=2, device=CPU
    )

    assert len(seen_pristine) == 1 + 2 + 3  # the checked call, warmup, timed
    assert all(seen_pristine)
    assert seen_norms == pytest.approx([workload.norm] * 6, rel=1e-5)
    assert all(n > max_norm for n in seen_norms)
    # The last call really clipped, so without the restore the next one would see max_norm.
    clipped = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in workload.grads])))
    assert clipped == pytest.approx(max_norm, rel=1e-4)


def test_time_calls_prepares_before_every_call_and_times_only_iters() -> None:
    log = []
    timing = measure.time_calls(
        lambda: log.append("call"),
        prepare=lambda: log.append("prep"),
        iters=4,
        warmup=2,
        device=CPU,
    )
    assert log == ["prep", "call"] * 6
    assert 0 <= timing.ms_min <= timing.ms_median


def test_interleaved_calls_take_turns_in_a_rotating_order() -> None:
    log = []
    calls = [(name, lambda name=name: log.append(name)) for name in "abc"]
    timings = measure.time_interleaved(calls, prepare=lambda: log.append("-"), iters=3, warmup=1,
                                       device=CPU)
    assert set(timings) == {"a", "b", "c"}
    rounds = "".join(log).split("-")[1:]
    assert ["".join(rounds[k:k + 3]) for k in range(0, 12, 3)] == ["abc", "bca", "cab", "abc"]


def test_a_failing_candidate_is_an_error_row_and_the_others_are_timed() -> None:
    workload = measure.Workload.create(FEW_SMALL, torch.float32, CPU)

    def broken(params, limit):
        raise RuntimeError("no kernels today")

    got = measure.measure([measure.Candidate("broken", broken), measure.candidates(CPU)[0][0]],
                          workload, 1.0, iters=2, warmup=0, device=CPU)
    assert isinstance(got["broken"], RuntimeError)
    timing, norm = got["torch"]
    assert timing.ms_median > 0 and norm == pytest.approx(workload.norm, rel=1e-5)


def _synthetic(spreads, busy=()):
    rows = [{"set": "s", "dtype": "fp32", "scenario": "clip", "implementation": impl,
             "ms_median": ms, "spread": spread, "ratio_to_floor": 1.5, "noisy": False,
             "speedup_vs_torch": None} for impl, ms, spread in spreads]
    for r in rows:
        r["noisy"] = r["spread"] > measure.NOISY_SPREAD
    measure._add_speedups(rows)
    meta = {**measure.metadata(CPU, 20e9, 5, 1), "copy_bandwidth_gbps": 20.0}
    return {"metadata": meta, "rows": rows, "skipped": [], "errors": [], "train_step": [],
            "load": {"cores": 2, "readable": True, "busy": list(busy), "samples": []}}


def test_noisy_rows_and_a_busy_machine_print_no_speedup() -> None:
    def cpp_row(text):
        return next(line for line in text.splitlines() if " cpp " in line).split()

    quiet = _synthetic([("torch", 2.0, 0.02), ("cpp", 1.0, 0.03)])
    console = Console(file=io.StringIO(), width=80)
    report.print_table(quiet, console)
    assert cpp_row(console.file.getvalue())[-1] == "2.00"
    assert "warning" not in console.file.getvalue()
    noisy = _synthetic([("torch", 2.0, 0.4), ("cpp", 1.0, 0.03)],
                       busy=["a median of 1 other runnable tasks during the run"])
    console = Console(file=io.StringIO(), width=80)
    report.print_table(noisy, console)
    text = console.file.getvalue()
    assert cpp_row(text)[-1] == "noisy"  # the baseline's spread marks its group
    words = " ".join(text.split())
    assert "the machine was busy (a median of 1 other runnable tasks" in words
    assert "2 of 2 rows spread over 15%" in words


def test_load_monitor_says_when_the_machine_is_busy() -> None:
    monitor = load.LoadMonitor(cores=2)
    monitor.samples = [{"t_s": 0, "load1": 0.3, "others_running": 0}] * 3
    assert monitor.busy_reasons() == []
    monitor.samples = [{"t_s": 0, "load1": 1.8, "others_running": 1}] * 3
    reasons = monitor.busy_reasons()
    assert len(reasons) == 2 and "load average 1.80 on 2 cores" in reasons[0]
    monitor.sample()
    if load.sample() is not None:
        assert {"t_s", "load1", "others_running"} <= set(monitor.samples[-1])


def test_progress_is_a_line_per_set_when_not_a_terminal(capsys: pytest.CaptureFixture) -> None:
    console = Console(file=io.StringIO(), width=80)
    assert not console.is_terminal
    measure.run(sets=[TINY, FEW_SMALL], dtypes=["fp32"], scenarios=["noclip"], iters=1,
                warmup=0, device="cpu", progress=True, console=console)
    err = capsys.readouterr().err
    assert "estimated" in err
    assert "[1/2] tiny done in" in err and "[2/2] few-small done in" in err
    assert "s left" in err


def test_default_run_is_the_headline_rows_and_training_steps() -> None:
    console = Console(file=io.StringIO(), width=80)
    res = measure.run(sets=[TINY], dtypes=["fp32"], iters=1, warmup=0, device="cpu",
                      progress=False, train_steps=1, console=console)
    assert {r["scenario"] for r in res["rows"]} == set(measure.HEADLINE_SCENARIOS)
    assert {r["implementation"] for r in res["rows"]} == {"torch", "cpp"} & (
        {"torch", "cpp"} if _CPP_ON_CPU else {"torch"})
    steps = res["train_step"]
    assert [(r["model"], r["variant"]) for r in steps] == [
        (m, v) for m in train_step.MODELS for v in train_step.VARIANTS]
    assert all(len(r["times_s"]) == 1 and r["median_s"] > 0 for r in steps)
    assert "training step" in console.file.getvalue()


def test_load_sets_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "sets.toml"
    path.write_text(TOML)
    sets = load_sets(path)
    assert set(sets) == {"mini-llama", "listed"}
    assert sets["listed"].shapes() == [(8, 4), (4,)]
    llama = sets["mini-llama"].shapes()
    assert (8 * 2, 32) in llama  # grouped-query k/v: kv_heads x head_dim rows
    assert llama[0] == llama[-1] == (100, 32)  # untied embedding and LM head
    assert sets["mini-llama"].default_on == "any"


@pytest.mark.parametrize(
    "text",
    ['[x]\nkind = "nope"', "[x]\nhidden = 3", '[x]\nkind = "one_huge"\nnumle = 3', "x = 1"],
)
def test_bad_toml_sets_raise_value_error(text: str) -> None:
    import tomllib

    with pytest.raises(ValueError):
        parse_sets(tomllib.loads(text))


def test_repo_sets_file_matches_the_built_in_sets() -> None:
    from_file = load_sets(REPO / "bench" / "sets.toml")
    assert set(from_file) == set(BUILTIN_SETS)
    for name, param_set in BUILTIN_SETS.items():
        assert from_file[name].shapes() == param_set.shapes(), name
        assert from_file[name].default_on == param_set.default_on, name


def test_built_in_set_sizes() -> None:
    assert DEFAULT_SETS["gpt2-small"].numel() == 124_439_808  # GPT-2 small with tied embeddings
    assert 0.9e9 < DEFAULT_SETS["llama-1b"].numel() < 1.2e9
    assert DEFAULT_SETS["small-5000"].num_tensors() == 5000
    assert CPU_SETS["huge-small"].nbytes(torch.bfloat16) == 2 * (1 << 22)
    assert CPU_SETS["huge-64m"].numel() == 1 << 26  # the CPU engine's bars are set on it
    for param_set in CPU_SETS.values():
        if param_set.name != "huge-64m":
            assert param_set.numel() < 10_000_000, param_set.name


def test_cpu_runs_leave_the_reference_out_of_huge_sets() -> None:
    chosen, _ = measure.candidates(CPU)
    skipped: list[dict[str, str]] = []
    small = measure._runs_set(chosen, CPU_SETS["small-500"], CPU, skipped)
    assert small == chosen and not skipped
    huge = measure._runs_set(chosen, CPU_SETS["huge-64m"], CPU, skipped)
    assert [c.name for c in huge] == [c.name for c in chosen if c.name != "ref"]
    assert skipped[0]["implementation"] == "ref"
    assert "huge-64m" in skipped[0]["reason"]
    headline, _ = measure.candidates(CPU, full=False)  # no reference: nothing to skip
    assert measure._runs_set(headline, CPU_SETS["huge-64m"], CPU, skipped) == headline
    assert len(skipped) == 1


def test_many_small_is_deterministic_and_in_range() -> None:
    shapes = many_small(n=1000, min_numel=3, max_numel=50, seed=7)
    assert shapes == many_small(n=1000, min_numel=3, max_numel=50, seed=7)
    assert shapes != many_small(n=1000, min_numel=3, max_numel=50, seed=8)
    assert all(3 <= s[0] <= 50 for s in shapes)
    assert {s[0] for s in shapes} >= {3, 50}


def test_default_sets_follow_the_device() -> None:
    assert measure.resolve_sets(None, CPU) == list(CPU_SETS.values())
    assert measure.resolve_sets(None, torch.device("cuda")) == list(DEFAULT_SETS.values())
    with pytest.raises(ValueError, match="unknown set"):
        measure.resolve_sets(["no-such-set"], CPU)


def test_cli_help_exits_zero() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fusedclip", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--sets-file" in proc.stdout
    assert proc.stdout.startswith("usage: python -m fusedclip bench [-h]")
    assert max(map(len, proc.stdout.splitlines())) <= 80


def test_cli_writes_a_users_run_apart_from_the_published_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the repository a run goes to bench/results/local/ (ignored by git); --publish writes
    the tracked bench/results/published/<device type>.json."""
    (tmp_path / "bench" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sets.toml").write_text(TOML)
    args = ["bench", "--sets-file", "sets.toml", "--sets", "listed", "--dtype", "fp32",
            "--scenario", "clip", "--iters", "1", "--warmup", "0", "--no-progress",
            "--device", "cpu"]
    assert main(args) == 0
    assert (tmp_path / "bench/results/local/results.json").is_file()
    assert not (tmp_path / "bench/results/published").exists()
    assert main([*args, "--publish"]) == 0
    assert (tmp_path / "bench/results/published/cpu.json").is_file()
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "bench/results/local/" in ignored


def test_cli_bench_runs_a_set_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets_file = tmp_path / "sets.toml"
    sets_file.write_text(TOML)
    out = tmp_path / "out"
    args = ["bench", "--sets-file", str(sets_file), "--sets", "listed", "--dtype", "fp32"]
    args += ["--scenario", "clip", "--iters", "1", "--warmup", "0", "--no-progress"]
    assert main([*args, "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["set"] for r in rows} == {"listed"}
    assert (out / "results.png").stat().st_size > 0


def test_cli_reports_unknown_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--sets", "no-such-set", "--device", "cpu", "--no-progress"]) == 2
    assert "unknown set" in capsys.readouterr().err


def test_cli_backends_lists_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    assert "reference: available" in capsys.readouterr().out  # (the rest: test_dispatch.py)
