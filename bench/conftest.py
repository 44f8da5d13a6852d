"""Micro-benchmarks of every operation, for regression tracking with pytest-benchmark:

    pytest bench --benchmark-only --benchmark-autosave      # save a run under .benchmarks/
    pytest bench --benchmark-only --benchmark-compare       # compare with the last saved run

Each backend that runs here is timed against torch's own function on the same gradients, on the
CPU always and on CUDA when a GPU is present; CUDA timings synchronize the device (the timer waits
for the GPU before reading the clock). ``make test`` does not run these (pytest's testpaths is
tests/); ``python -m fusedclip bench`` is the full benchmark against the memory floor.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def timed(benchmark):
    """``timed(call, restore)``: ``call`` timed once per round, ``restore`` run untimed before
    each (CUDA cases carry a ``benchmark(timer=...)`` mark that synchronizes the device)."""

    def run(call, restore):
        return benchmark.pedantic(call, setup=restore, rounds=20, iterations=1,
                                  warmup_rounds=2)

    return run
