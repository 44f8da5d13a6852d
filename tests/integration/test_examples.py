"""The scripts in examples/ run as a user runs them (few steps, on the CPU here), and what they
print says they trained and clipped: finite losses and norms, every step's norm over the limit
(each example sets it below its model's gradient norm), and the norm after clipping at the limit.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from fusedclip.backends.cpp import _lib

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NUMBER = r"([-+0-9.eE]+|nan|inf|-inf)"
# "loss A -> B in N steps; last grad norm C -> D (max_norm E); clipped K of N steps"
SUMMARY = re.compile(
    rf"loss {NUMBER} -> {NUMBER} in (\d+) steps; last grad norm {NUMBER} -> {NUMBER} "
    rf"\(max_norm {NUMBER}\); clipped (\d+) of (\d+) steps"
)


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _check_clipped(before: float, after: float, max_norm: float) -> None:
    """A finite norm over the limit before clipping, the limit itself (to rounding) after."""
    assert math.isfinite(before) and before > max_norm
    assert after == pytest.approx(max_norm, rel=1e-3)


def _summary(stdout: str, steps: int) -> dict[str, float]:
    found = SUMMARY.search(stdout)
    assert found, stdout
    first, last, n, before, after, max_norm, clipped, of = found.groups()
    assert int(n) == int(of) == steps, stdout
    assert math.isfinite(float(first)) and math.isfinite(float(last)), stdout
    _check_clipped(float(before), float(after), float(max_norm))
    assert int(clipped) == steps, stdout  # every step clipped
    return {"first": float(first), "last": float(last)}


def test_amp_training():
    out = _run("amp_training.py", "--steps", "3", "--device", "cpu")
    assert out.startswith("cpu: "), out
    losses = _summary(out, 3)
    assert losses["last"] < losses["first"], out  # the clipped steps still train
    scale = re.search(r"loss scale (\d+)", out)
    assert scale and float(scale[1]) > 0, out  # no inf/NaN step drove the scale down to 0


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("offload", [False, True], ids=["sharded", "cpu-offload"])
def test_fsdp2_training(offload):
    """On gloo both modes' gradients are CPU DTensors: auto clips them with the CPU engine."""
    out = _run("fsdp2_training.py", "--spawn", "2", "--steps", "2",
               *(["--cpu-offload"] if offload else []))
    assert out.startswith("2 ranks (gloo, CPU offload): " if offload else "2 ranks (gloo): "), out
    losses = _summary(out, 2)
    assert losses["last"] < losses["first"], out
    auto = "cpp" if _lib.loaded() else "reference"
    assert out.rstrip().endswith(f"; gradients on cpu, backend {auto}"), out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs transformers")
def test_trainer_patch():
    out = _run("trainer_patch.py", "--steps", "2")
    steps = re.findall(rf"step (\d+): grad norm {NUMBER} -> {NUMBER} \(max_grad_norm {NUMBER}\)",
                       out)
    assert [int(s[0]) for s in steps] == [1, 2], out
    for _, before, after, max_norm in steps:
        _check_clipped(float(before), float(after), float(max_norm))
    found = re.search(rf"fusedclip doing the clipping \(patched at (\d+) of (\d+) steps, backend "
                      rf"(\w+); clipped (\d+) of (\d+) steps\): loss {NUMBER}", out)
    assert found, out
    patched, of, backend, clipped, of_clipped, loss = found.groups()
    assert int(patched) == int(of) == int(clipped) == int(of_clipped) == 2, out
    assert backend in ("cpp", "triton", "reference"), out
    assert math.isfinite(float(loss)), out
