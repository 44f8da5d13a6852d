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
from fusedclip.tools.bench import measure, report
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
    """One CPU run of the engine on two tiny sets, both dtypes and every scenario."""
    out = tmp_path_factory.mktemp("bench")
    console = Console(file=io.StringIO(), width=200)
    res = measure.run(
        sets=[TINY, FEW_SMALL],
        iters=2,
        warmup=1,
        device="cpu",
        out_dir=out,
        progress=False,
        console=console,
    )
    return res, out, console.file.getvalue()


def test_run_writes_json_with_metadata_and_rows(results: tuple[dict, Path, str]) -> None:
    res, out, _ = results
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) == {"metadata", "rows", "skipped", "errors"}
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
    assert {"torch-foreach", "torch-loop", "fusedclip-reference"} <= impls
    assert ("fusedclip-cpp" in impls) == _CPP_ON_CPU
    assert "fusedclip-triton" not in impls
    # sets x dtypes x scenarios x implementations
    assert len(rows) == 2 * 2 * len(measure.SCENARIOS) * len(impls)
    for r in rows:
        assert r["ratio_to_floor"] > 0
        assert r["gbps"] > 0
        assert r["ms_min"] <= r["ms_median"]
        assert r["speedup_vs_torch_foreach"] > 0
        passes = measure.FLOOR_PASSES[r["scenario"]]
        assert r["floor_bytes"] == passes * r["grad_bytes"]


@pytest.mark.parametrize("impl", ["fusedclip-reference", "fusedclip-cpp"])
def test_fusedclip_rows_report_the_true_norm(results: tuple[dict, Path, str], impl: str) -> None:
    if impl == "fusedclip-cpp" and not _CPP_ON_CPU:
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
    assert "fusedclip-reference" in printed
    assert ("fusedclip-cpp" in printed) == _CPP_ON_CPU
    assert "skipped fusedclip-triton: runs CUDA tensors" in printed


def test_report_renders_the_saved_results(results: tuple[dict, Path, str], tmp_path: Path) -> None:
    """``report`` works from results.json alone: the table and the plot of a saved run."""
    _, out, printed = results
    saved = json.loads((out / "results.json").read_text())
    console = Console(file=io.StringIO(), width=200)
    report.print_table(saved, console)
    assert console.file.getvalue() in printed  # the table run() printed, then its file names
    report.plot(saved, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_candidates_and_skips() -> None:
    """On the CPU: torch, the reference and (when built) the C++ engine run; Triton is skipped
    with its reason (its interpreter is a test tool, not worth timing)."""
    chosen, skipped = measure.candidates(CPU)
    names = [c.name for c in chosen]
    assert names[:3] == ["torch-foreach", "torch-loop", "fusedclip-reference"]
    assert ("fusedclip-cpp" in names) == _CPP_ON_CPU
    reasons = {s["implementation"]: s["reason"] for s in skipped}
    assert "fusedclip-triton" not in names
    assert "Triton's interpreter" in reasons["fusedclip-triton"]
    if _CPP_ON_CPU:
        assert set(reasons) == {"fusedclip-triton"}
    else:
        assert reasons["fusedclip-cpp"] == _select.backend_status("cpp").reason


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
        measure.Candidate("spy", spy), workload, max_norm, iters=3, warmup=2, device=CPU
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
    assert [c.name for c in huge] == [c.name for c in chosen if c.name != "fusedclip-reference"]
    assert skipped[0]["implementation"] == "fusedclip-reference"
    assert "huge-64m" in skipped[0]["reason"]


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
