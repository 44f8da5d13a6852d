"""The torch versions fusedclip supports, the torch/Triton pairs CI tests, and what is installed.

``TORCH_MIN`` is checked when fusedclip is imported (and declared in setup.py). ``CI_TESTED`` says
which pairs CI runs and how; tests/api/test_versions.py holds it to the lock files CI installs
(requirements/lock-*.txt), so that this list cannot drift from what CI really tests.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess

import torch

TORCH_MIN = (2, 6)


@dataclasses.dataclass(frozen=True)
class TestedPair:
    torch: str  # the release, without a local tag (+cpu, +cu130)
    triton: str | None  # None: no Triton in that environment
    lock: str  # the lock file under requirements/ that CI installs it from
    what: str  # what CI builds and runs with it


CI_TESTED = (
    TestedPair("2.6.0", "3.2.0", "lock-torch-2.6.0.txt",
               "the oldest torch declared: CPU engine from the sdist; API, engine and feature "
               "tests that depend on the version, Triton in its interpreter"),
    TestedPair("2.11.0", "3.6.0", "lock-torch-2.11.0.txt",
               "the GPU machines' pair: CPU engine and CUDA kernels (sm_90) from the sdist; API, "
               "engine and feature tests that depend on the version, Triton in its interpreter"),
    TestedPair("2.13.0", None, "lock-cpu-torch.txt",
               "a CPU build of torch: CPU engine installed from the sdist; API, engine and "
               "feature tests (not slow)"),
    TestedPair("2.14.1", "3.8.0", "lock-dev.txt",
               "the development pair: CPU engine and CUDA kernels (sm_90); the whole suite, "
               "Triton in its interpreter, sanitizers"),
    TestedPair("2.15.0", "3.9.0", "lock-torch-2.15.0.txt",
               "the newest torch: CPU engine from the sdist; API, engine and feature tests that "
               "depend on the version, Triton in its interpreter"),
)


def release(version: str) -> tuple[int, ...]:
    """(2, 14, 1) for '2.14.1+cu130' or '2.15.0a0+git123'."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def check_torch(version: str) -> None:
    """Refuses a torch older than TORCH_MIN, saying which versions are supported."""
    if release(version)[:2] < TORCH_MIN:
        floor = ".".join(map(str, TORCH_MIN))
        tested = ", ".join(p.torch for p in CI_TESTED)
        raise ImportError(
            f"fusedclip needs torch>={floor}, found torch {version} (CI tests {tested}): "
            f"upgrade torch (pip install 'torch>={floor}')"
        )


def tested_pair(torch_version: str, triton_version: str | None) -> TestedPair | None:
    """The CI pair with this torch release and this Triton (or none), if there is one."""
    torch_release = ".".join(map(str, release(torch_version)))
    for pair in CI_TESTED:
        if pair.torch == torch_release and pair.triton == triton_version:
            return pair
    return None


def _first_line(*command: str) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return lines[0].strip() if out.returncode == 0 and lines else None


def compilers() -> dict[str, str]:
    """The host C++ compiler and nvcc a build would use here ('not found' where missing)."""
    cxx = os.environ.get("CXX", "c++")
    found = {"c++": _first_line(cxx, "--version") or f"not found ({cxx})"}
    default_home = "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None
    cuda_home = os.environ.get("CUDA_HOME") or default_home
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    release_line = None
    if nvcc and os.path.exists(nvcc):
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20,
                             check=False).stdout
        release_line = next((ln.strip() for ln in out.splitlines() if "release" in ln), None)
        release_line = f"{release_line} ({nvcc})" if release_line else None
    found["nvcc"] = release_line or "not found (set CUDA_HOME to build the CUDA kernels)"
    return found


check_torch(torch.__version__)
