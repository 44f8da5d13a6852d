"""The test matrix: every backend on CPU tensors, and on CUDA tensors when a GPU is present.

Tests that take the ``backend`` and ``device`` fixtures run once per (backend, device) pair;
``engine_target`` is the same for the two compiled backends (the operator suite). A pair that
cannot run here is a visible skip with its reason (the summary at the end counts the skips by
reason), never a silent omission: no GPU, no ``fusedclip._C``, no Triton, or Triton's interpreter
off. CI sets ``FUSEDCLIP_REQUIRE_EXTENSION=1`` and ``FUSEDCLIP_REQUIRE_TRITON=1``, which turn a
missing extension or Triton leg into an error instead.
"""

from __future__ import annotations

import collections
import os
import time

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on before
# Triton is first imported: that is how every CI run tests their logic.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from matrix import ENGINES, target_params  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip.backends.cpp import _lib  # noqa: E402


def _required_pieces() -> None:
    """What CI demands: the extension, and Triton in its interpreter (without a GPU)."""
    if os.environ.get("FUSEDCLIP_REQUIRE_EXTENSION") == "1" and not _lib.loaded():
        raise RuntimeError(f"FUSEDCLIP_REQUIRE_EXTENSION=1 but fusedclip._C did not load: "
                           f"{_lib.LOAD_ERROR}")
    if os.environ.get("FUSEDCLIP_REQUIRE_TRITON") == "1":
        status = fusedclip.available_backends()["triton"]
        if not status.available:
            raise RuntimeError(f"FUSEDCLIP_REQUIRE_TRITON=1 but Triton cannot run: {status.reason}")


_required_pieces()


def pytest_report_header(config):
    """Which fusedclip is under test (the source tree's or an installed copy), and its engine."""
    engine = (f"fusedclip._C loaded, CUDA kernels: {_lib.cuda_kernels()}" if _lib.loaded()
              else f"fusedclip._C not loaded: {_lib.LOAD_ERROR}")
    return f"fusedclip: {os.path.dirname(fusedclip.__file__)}; {engine}; torch {torch.__version__}"


def pytest_terminal_summary(terminalreporter):
    """Every skip reason once, with how many tests it skipped: what this machine did not test."""
    reasons = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[message.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("skipped, by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:6d}  {reason}")


# A wall-clock deadline (seconds since the epoch) for a run that must end inside a time budget
# (bench/device_check.sh on a GPU machine): tests that would start after it are skipped, with this
# reason in the summary, so that the run still ends with its counts instead of being killed.
_DEADLINE = float(os.environ.get("FUSEDCLIP_TEST_DEADLINE") or 0)


def pytest_runtest_setup(item):
    if _DEADLINE and time.time() > _DEADLINE:
        pytest.skip("not started: past FUSEDCLIP_TEST_DEADLINE (the run's time budget)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=target_params())
def target(request) -> tuple[str, str]:
    return request.param


@pytest.fixture
def backend(target) -> str:
    """A backend name, paired with ``device``: the public API's matrix."""
    return target[0]


@pytest.fixture
def device(target) -> str:
    """``"cpu"`` or ``"cuda"``: where ``backend``'s tensors live."""
    return target[1]


@pytest.fixture(params=target_params(ENGINES))
def engine_target(request) -> tuple[str, str]:
    return request.param


@pytest.fixture(autouse=True)
def _torch_left_unpatched():
    """Tests compare with torch's functions: a test that leaves them patched fails (and they are
    put back), instead of making later tests compare fusedclip with itself."""
    yield
    if fusedclip.is_patched():
        fusedclip.unpatch()
        pytest.fail("the test left torch.nn.utils patched")
