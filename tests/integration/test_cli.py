"""``python -m fusedclip check`` and the top-level help (the bench command is tested in
test_benchmark.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import fusedclip
from fusedclip import _select
from fusedclip.tools import selfcheck
from fusedclip.tools.cli import main

pytestmark = pytest.mark.slow


def test_top_level_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "fusedclip", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m fusedclip [-h] COMMAND")
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    for command in ("check", "bench", "backends"):
        assert listed.count(command) == 1, proc.stdout  # each command listed once, with its text


def test_check_passes_and_reports_every_backend(monkeypatch, capsys):
    """One run of the command checks every backend on every device it runs here."""
    runs = []
    real = selfcheck.run_check
    monkeypatch.setattr(selfcheck, "run_check", lambda seconds: runs.append(real(seconds)) or
                        runs[-1])
    assert main(["check", "--seconds", "3"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "pass" in out and "FAIL" not in out
    assert len(runs) == 1
    results = runs[0]
    assert {r.backend for r in results} == set(_select.BACKEND_NAMES)
    status = fusedclip.available_backends()
    for name in _select.BACKEND_NAMES:
        mine = [r for r in results if r.backend == name]
        expected = {d for d in ("cpu", "cuda") if status[name].runs_on(d)
                    and (d == "cpu" or torch.cuda.is_available())}
        assert {r.device for r in mine if r.available} == expected, name
        for r in mine:
            if not r.available:  # listed, with the reason, not silently left out
                assert not expected and r.reason == status[name].reason
                assert re.search(rf"^\s*{name}\s+-\s+cannot run here", out, re.M), out
                continue
            assert r.passed and r.cases >= 1, (name, r.device, r.failures)
            assert re.search(rf"^\s*{name}\s+{r.device}\s+pass\s+{r.cases}\s", out, re.M), out
    # Here: the reference, the C++ engine (when built) and Triton's interpreter, on CPU tensors.
    assert "reference" in {r.backend for r in results if r.available and r.device == "cpu"}


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
