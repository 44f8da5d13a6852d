"""The scripts in examples/ run as a user runs them (few steps, on the CPU here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_amp_training():
    assert "loss" in _run("amp_training.py", "--steps", "3", "--device", "cpu")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_fsdp2_training():
    assert "2 ranks" in _run("fsdp2_training.py", "--spawn", "2", "--steps", "2")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs transformers")
def test_trainer_patch():
    assert "fusedclip doing the clipping" in _run("trainer_patch.py", "--steps", "2")
