"""Real multi-process runs for the distributed tests: ``spawn`` starts ``world`` ranks that talk
over gloo on the CPU and returns what each saved.

Starting ranks (a fresh Python, torch, gloo) is what these tests cost, and the mesh and all-reduce
logic is the same for every backend: so a test spawns once and hands its ranks ``cpu_backends()``,
which every rank runs in turn, each against the same expectations. A backend that cannot run CPU
tensors here is not run, and ``backends_not_run`` says why (each module turns that into a visible
skip).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedclip

# A rank left waiting in a collective (say, ranks that order their reductions differently) fails
# the test after this long rather than hanging CI: mesh groups' own timeout is 30 minutes.
TIMEOUT_S = 300


def cpu_backends() -> list[str]:
    """Every backend that runs CPU tensors here (Triton: in its interpreter, which conftest
    switches on without a GPU and the ranks inherit), in fusedclip's order."""
    return [name for name, status in fusedclip.available_backends().items()
            if status.runs_on("cpu")]


def backends_not_run() -> dict[str, str]:
    """The backends ``cpu_backends`` leaves out, each with the reason."""
    return {name: status.reason for name, status in fusedclip.available_backends().items()
            if not status.runs_on("cpu")}


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


def check_backends_ran(per_rank: list[dict], backends: list[str]) -> None:
    """Every rank returned results for every backend it was given, and only those."""
    assert backends, "no backend runs CPU tensors here"
    for rank, results in enumerate(per_rank):
        assert list(results) == backends, f"rank {rank} ran {list(results)}, not {backends}"


@contextlib.contextmanager
def about(what: str):
    """Prefixes a failed assertion inside the block with ``what`` (which backend, which rank)."""
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from e
