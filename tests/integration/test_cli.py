"""``python -m fusedclip check`` and the top-level help (the bench command is tested in
test_benchmark.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fusedclip import selfcheck
from fusedclip.__main__ import main


def test_top_level_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "fusedclip", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m fusedclip [-h] COMMAND")
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    for command in ("check", "bench", "backends"):
        assert listed.count(command) == 1, proc.stdout  # each command listed once, with its text


def test_check_passes_and_reports_every_backend(cpu_backend, capsys):
    assert main(["check", "--seconds", "3"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "pass" in out and "FAIL" not in out
    results = {r.backend: r for r in selfcheck.run_check(1.0)}
    assert set(results) == {"cuda", "triton", "reference"}
    assert results["reference"].passed and results["reference"].cases >= 1
    assert results[cpu_backend.replace("cuda-ops-on-cpu", "cuda")].passed


def test_check_cases_cover_every_dtype_norm_type_and_mode():
    cases = list(selfcheck._cases())
    norm_cases = {(d, p, m) for kind, d, p, m in cases if kind == "norm"}
    assert len(norm_cases) == len(selfcheck.DTYPES) * len(selfcheck.NORM_TYPES) * 2
    assert {d for kind, d, _, _ in cases if kind == "value"} == set(selfcheck.DTYPES)
    first = cases[:8]  # a short budget still sees every dtype
    assert {d for _, d, _, _ in first} == set(selfcheck.DTYPES)


@pytest.mark.parametrize("fault", ["norm", "element", "crash"])
def test_check_fails_on_a_wrong_backend(monkeypatch, capsys, fault):
    """The self-check can fail: a backend off by one part in 10^4, or one that raises."""
    real = selfcheck.api.clip_grad_norm_

    def faulty(params, *args, **kwargs):
        if fault == "crash":
            raise RuntimeError("kernel exploded")
        norm = real(params, *args, **kwargs)
        if fault == "element":
            params[0].grad.mul_(1.0001)
            return norm
        return norm * 1.0001

    monkeypatch.setattr(selfcheck.api, "clip_grad_norm_", faulty)
    assert main(["check", "--seconds", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    assert ("kernel exploded" in out) == (fault == "crash")


def test_error_measure():
    e = torch.tensor([1.0, 2.0, float("nan")], dtype=torch.float64)
    assert selfcheck._error(e, e, 1e-5) == 0.0
    assert selfcheck._error(e * (1 + 2e-5), e, 1e-5) == pytest.approx(2.0, rel=1e-3)
    other = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert selfcheck._error(other, e, 1e-5) == float("inf")  # NaN where NaN is expected only
