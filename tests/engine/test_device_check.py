"""bench/device_check.sh, the one call a GPU machine gets, checked here without one: its syntax, and
its control flow under DRY_RUN=1 (every GPU command a stub): the stages in order, each under a
timeout that fits the budget, a hung stage ended by its timeout while the others still report, at
most 8 files in $OUT, and the summary printed last."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_check.sh"
STAGES = ["build", "tests", "check", "bench", "ncu", "sanitizer", "variants", "slowtests"]
BUDGET_S = 420
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path, float]:
    out = tmp_path / "out"
    full = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True,
                          timeout=120)
    return proc, out, time.monotonic() - t0


def stage_lines(stdout: str) -> list[tuple[str, int, int]]:
    """(stage, limit, seconds of the budget left) of every '=== stage' line."""
    return [(m[1], int(m[2]), int(m[3]))
            for m in re.finditer(r"=== stage (\w+) \(limit (\d+)s, (-?\d+)s of the budget left\)",
                                 stdout)]


@needs_bash
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "error", str(SCRIPT)], check=True)


@needs_bash
def test_dry_run_runs_every_stage_within_the_budget(tmp_path):
    proc, out, seconds = run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started = stage_lines(proc.stdout)
    assert [s for s, _, _ in started] == STAGES
    for _, limit, left in started:
        assert 0 < limit <= left <= BUDGET_S
    # Every cap together fits the budget only through the cut to what is left; each is bounded.
    assert all(limit <= 150 for _, limit, _ in started)
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    assert files == sorted(["summary.txt", "ptxas.txt", "tests.log", "bench.log", "bench.json",
                            "variants.json", "ncu.txt", "sanitizer.log"])
    # The summary is printed last: every stage's row, then the tables.
    tail = proc.stdout[proc.stdout.index("=== fusedclip device check"):]
    assert "DRY_RUN" in tail
    for stage in STAGES:
        assert re.search(rf"^{stage}\s+ok\s", tail, re.M), (stage, tail)
    assert "x floor" in tail and "pass-1 variants" in tail and "ncu:" in tail
    assert (out / "summary.txt").read_text() in proc.stdout
    assert seconds < 60


@needs_bash
def test_a_hung_stage_is_ended_by_its_timeout_and_the_rest_still_run(tmp_path):
    proc, out, seconds = run(tmp_path, DRY_RUN_HANG="tests", CAP_TESTS="2", MIN_STAGE_S="1")
    assert proc.returncode != 0  # a timed-out stage fails the check
    tail = proc.stdout[proc.stdout.index("=== fusedclip device check"):]
    assert re.search(r"^tests\s+timeout\s+[23]\s+2\b", tail, re.M), tail
    for stage in STAGES[2:]:
        assert re.search(rf"^{stage}\s+ok\s", tail, re.M), (stage, tail)
    assert seconds < 2 + 60


@needs_bash
def test_stages_past_the_budget_are_skipped_not_run(tmp_path):
    proc, out, _ = run(tmp_path, DRY_RUN_HANG="tests", CAP_TESTS="4", BUDGET_S="6",
                       RESERVE_S="1", MIN_STAGE_S="2")
    tail = proc.stdout[proc.stdout.index("=== fusedclip device check"):]
    assert re.search(r"^tests\s+timeout", tail, re.M), tail
    assert re.search(r"^slowtests\s+skipped\s.*no time left", tail, re.M), tail
    for _, limit, left in stage_lines(proc.stdout):
        assert limit <= left


@needs_bash
def test_a_failed_build_skips_the_stages_that_need_it(tmp_path):
    proc, out, _ = run(tmp_path, DRY_RUN_HANG="build", CAP_BUILD="1", MIN_STAGE_S="1")
    tail = proc.stdout[proc.stdout.index("=== fusedclip device check"):]
    assert re.search(r"^build\s+timeout", tail, re.M), tail
    for stage in STAGES[1:]:
        assert re.search(rf"^{stage}\s+skipped\s.*the build failed", tail, re.M), (stage, tail)
    assert (out / "summary.txt").is_file()
