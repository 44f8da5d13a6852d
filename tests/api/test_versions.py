"""The torch versions fusedclip supports: the import-time floor, the pairs CI tests (held to the
lock files and the Makefile that CI installs from) and what ``python -m fusedclip check`` says."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

from fusedclip import _versions
from fusedclip.tools import selfcheck

ROOT = pathlib.Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"


def _pins(lock: str) -> dict[str, str]:
    text = (REQUIREMENTS / lock).read_text()
    return dict(re.findall(r"^([a-z0-9-]+)==(\S+)$", text, flags=re.M))


def _make_variable(name: str) -> list[str]:
    match = re.search(rf"^{name} \?= (.*)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert match, f"the Makefile sets no {name}"
    return match.group(1).split()


@pytest.mark.parametrize("pair", _versions.CI_TESTED, ids=lambda p: p.torch)
def test_each_tested_pair_is_the_lock_ci_installs(pair):
    pins = _pins(pair.lock)
    assert _versions.release(pins["torch"]) == _versions.release(pair.torch), pair.lock
    assert pins.get("triton") == pair.triton, pair.lock


def test_the_makefile_installs_every_tested_torch_and_no_other():
    installed = (_make_variable("TORCH_VERSION") + _make_variable("CPU_TORCH_VERSION")
                 + _make_variable("EDGE_TORCH"))
    assert sorted(installed) == sorted(p.torch for p in _versions.CI_TESTED)
    assert _make_variable("EDGE_CUDA")[0] in _make_variable("EDGE_TORCH")
    locks = sorted(p.name for p in REQUIREMENTS.glob("lock-*.txt"))
    assert locks == sorted(p.lock for p in _versions.CI_TESTED)


def test_the_oldest_tested_torch_is_the_declared_floor():
    setup = (ROOT / "setup.py").read_text()
    floor = ".".join(map(str, _versions.TORCH_MIN))
    assert f'"torch>={floor}"' in setup
    oldest = min(_versions.release(p.torch) for p in _versions.CI_TESTED)
    assert oldest[:2] == _versions.TORCH_MIN


@pytest.mark.parametrize("version", ["2.5.1", "2.5.0+cpu", "1.13.1", "2.4.0a0+git1234"])
def test_an_older_torch_is_refused_naming_the_supported_range(version):
    with pytest.raises(ImportError, match=r"needs torch>=2\.6, found torch .*CI tests 2\.6\.0"):
        _versions.check_torch(version)


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0+cu124", "2.15.0", "2.16.0a0+git1234", "3.0.0"])
def test_a_supported_torch_is_accepted(version):
    _versions.check_torch(version)


def test_importing_fusedclip_under_an_old_torch_fails_with_the_reason():
    code = "import torch; torch.__version__ = '2.5.1'; import fusedclip"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, check=False)
    assert out.returncode != 0
    assert "ImportError: fusedclip needs torch>=2.6, found torch 2.5.1" in out.stderr


@pytest.mark.parametrize(("torch_version", "triton_version", "tested"), [
    ("2.14.1", "3.8.0", "2.14.1"), ("2.14.1+cu130", "3.8.0", "2.14.1"),
    ("2.13.0+cpu", None, "2.13.0"), ("2.11.0+cu130", "3.6.0", "2.11.0"),
    ("2.14.1", "3.6.0", None), ("2.13.0+cpu", "3.5.0", None), ("2.7.0", "3.3.0", None),
])
def test_tested_pair(torch_version, triton_version, tested):
    pair = _versions.tested_pair(torch_version, triton_version)
    assert (pair.torch if pair else None) == tested


def test_check_prints_the_versions_and_whether_ci_tests_the_pair():
    lines = selfcheck.environment()
    text = "\n".join(lines)
    assert f"torch {torch.__version__}" in lines[0]
    assert "Triton " in lines[0] and "Python " in lines[0]
    assert re.search(r"^c\+\+: ", text, flags=re.M) and re.search(r"^nvcc: ", text, flags=re.M)
    assert "fusedclip._C: " in text
    assert re.search(r"a pair CI tests|not a pair CI tests", text)


def test_check_names_an_untested_pair_and_the_tested_ones(monkeypatch):
    monkeypatch.setattr(selfcheck, "_triton_version", lambda: "0.1.0")
    text = "\n".join(selfcheck.environment())
    assert "with Triton 0.1.0: not a pair CI tests (CI tests torch 2.6.0 with Triton 3.2.0;" in text


def test_check_says_how_to_get_what_is_missing(monkeypatch):
    from fusedclip.backends.cpp import _lib

    monkeypatch.setattr(selfcheck, "_triton_version", lambda: None)
    monkeypatch.setattr(_lib, "loaded", lambda: False)
    text = "\n".join(selfcheck.environment())
    assert "fusedclip._C: not built or not loadable" in text
    assert "to get fusedclip._C: " in text and "FUSEDCLIP_BUILD_EXT=0" in text
    assert "to get the triton backend: pip install triton" in text
