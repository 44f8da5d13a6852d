"""How busy the machine is while the benchmark runs: samples of the load average and of the
runnable tasks that are not the benchmark's own, so that a run beside other work says so instead
of printing its speedups as facts.

Linux only (``/proc``); elsewhere nothing is sampled and the report says the load was not read.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

__all__ = ["LoadMonitor"]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _own_running() -> int:
    """This process's threads that are running or runnable (its OpenMP workers may still spin)."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        stat = _read(f"/proc/self/task/{tid}/stat")
        # The state follows the parenthesised command name, which may itself hold spaces.
        if stat and stat.rsplit(")", 1)[-1].split()[0] == "R":
            count += 1
    return max(count, 1)


def sample() -> dict[str, float] | None:
    """One reading: the 1-minute load average and the runnable tasks of other processes."""
    loadavg, stat = _read("/proc/loadavg"), _read("/proc/stat")
    if loadavg is None or stat is None:
        return None
    running = next((int(line.split()[1]) for line in stat.splitlines()
                    if line.startswith("procs_running ")), None)
    if running is None:
        return None
    return {"load1": float(loadavg.split()[0]), "others_running": max(0, running - _own_running())}


@dataclasses.dataclass
class LoadMonitor:
    """Samples taken before the run and between its measurements."""

    cores: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    samples: list[dict[str, float]] = dataclasses.field(default_factory=list)
    _start: float = dataclasses.field(default_factory=time.monotonic)

    def sample(self) -> None:
        reading = sample()
        if reading is not None:
            self.samples.append({"t_s": round(time.monotonic() - self._start, 2), **reading})

    @property
    def readable(self) -> bool:
        return bool(self.samples)

    def busy_reasons(self) -> list[str]:
        """Why the numbers may not be trusted (empty: the machine looked idle). Busy before the
        run: a 1-minute load above half the cores; during it: other runnable tasks in most
        samples (at least a quarter of the cores, and at least one)."""
        if not self.samples:
            return []
        reasons = []
        first = self.samples[0]
        if first["load1"] > self.cores / 2:
            reasons.append(f"load average {first['load1']:.2f} on {self.cores} cores before the "
                           "run")
        others = statistics.median(s["others_running"] for s in self.samples)
        if others >= max(1, self.cores // 4):
            reasons.append(f"a median of {others:g} other runnable tasks during the run")
        return reasons

    def as_dict(self) -> dict[str, Any]:
        return {"cores": self.cores, "readable": self.readable, "busy": self.busy_reasons(),
                "samples": self.samples}
