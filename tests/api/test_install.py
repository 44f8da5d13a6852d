"""What setup.py builds, and what it says, when a piece of the build is missing or refused."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _setup(**env: str) -> subprocess.CompletedProcess:
    """``setup.py --name`` (it decides what to build, says so, and builds nothing)."""
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, **env})


def test_without_a_compiler_auto_installs_the_pure_python_package_and_says_why():
    out = _setup(CXX="/nonexistent/g++", FUSEDCLIP_BUILD_EXT="auto")
    assert out.returncode == 0, out.stderr
    assert ("not building fusedclip._C (FUSEDCLIP_BUILD_EXT=auto): no C++ compiler found "
            "(/nonexistent/g++: set CXX or install g++); pure-Python install") in out.stderr


@pytest.mark.parametrize("setting", ["cpu", "cuda"])
def test_without_a_compiler_an_asked_for_build_fails_saying_why(setting):
    out = _setup(CXX="/nonexistent/g++", FUSEDCLIP_BUILD_EXT=setting)
    assert out.returncode != 0
    assert f"FUSEDCLIP_BUILD_EXT={setting} but fusedclip._C cannot be built: no C++ compiler" \
        in out.stderr


def test_build_ext_0_installs_the_pure_python_package():
    out = _setup(FUSEDCLIP_BUILD_EXT="0")
    assert out.returncode == 0, out.stderr
    assert "not building fusedclip._C (FUSEDCLIP_BUILD_EXT=0): pure-Python install" in out.stderr


def test_an_unknown_build_setting_is_refused():
    out = _setup(FUSEDCLIP_BUILD_EXT="yes")
    assert out.returncode != 0
    assert "FUSEDCLIP_BUILD_EXT must be auto, cpu, cuda (or 1) or 0, got 'yes'" in out.stderr
