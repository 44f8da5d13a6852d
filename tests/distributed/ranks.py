"""Real multi-process runs for the distributed tests: ``spawn`` starts ``world`` ranks that talk
over gloo on the CPU and returns what each saved."""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A rank left waiting in a collective (say, ranks that order their reductions differently) fails
# the test after this long rather than hanging CI: mesh groups' own timeout is 30 minutes.
TIMEOUT_S = 300


def enable_cpu_operators() -> None:
    """What conftest's cpu_backend fixture does for "cuda-ops-on-cpu", in a spawned rank."""
    from fusedclip import backends

    backends._RUNS_ON["cuda"] = None
    backends._STATUS["cuda"] = lambda: backends.BackendStatus(True, "test: CPU operators")
    backends.backend_status.cache_clear()


def spawned_backend(cpu_backend: str) -> str:
    """What a test passes to its ranks for a cpu_backend fixture value: the fixture's patch does
    not reach spawned processes, so "cuda" travels as "cuda-ops-on-cpu" (see rank_backend)."""
    return "cuda-ops-on-cpu" if cpu_backend == "cuda" else cpu_backend


def rank_backend(backend: str) -> str:
    """The backend name for fusedclip calls in a rank, given a cpu_backend fixture value."""
    if backend == "cuda-ops-on-cpu":
        enable_cpu_operators()
        return "cuda"
    return backend


def _main(rank, world, init_file, out_dir, fn, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> list[object]:
    """Runs ``fn(rank, world, *args)`` in ``world`` processes of one gloo group; returns each
    rank's result. An exception in a rank (a failed assert) fails the caller with its traceback."""
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        ranks = mp.spawn(_main, args=(world, init_file, out_dir, fn, args), nprocs=world,
                         join=False)
        deadline = time.monotonic() + TIMEOUT_S
        while not ranks.join(timeout=1):  # raises with a failed rank's traceback
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                raise TimeoutError(f"{world} ranks still running after {TIMEOUT_S} s: some rank "
                                   "waits in a collective that another never joins")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]
