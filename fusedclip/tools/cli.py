"""Command line: ``python -m fusedclip bench``, ``check`` and ``backends``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fusedclip import _select
from fusedclip.tools.bench import measure, sets

# Defaults that depend on where the command runs: the repository's bench/ folder when it is there.
REPO_SETS_FILE = Path("bench/sets.toml")
REPO_RESULTS_DIR = Path("bench/results")
LOCAL_RESULTS_DIR = REPO_RESULTS_DIR / "local"  # a user's runs (ignored by git)
PUBLISHED_RESULTS_DIR = REPO_RESULTS_DIR / "published"  # the README's numbers (tracked)
FALLBACK_RESULTS_DIR = Path("fusedclip-bench")

BENCH_DESCRIPTION = """\
Time fusedclip against torch.nn.utils.clip_grad_norm_ on named parameter
sets, in bf16 and fp32, and compare every time with a memory floor: the time
needed just to move the gradient bytes at this device's measured copy
bandwidth.

The default run is the headline rows: torch against fusedclip's compiled
engine (cpp; and triton on a GPU) in four scenarios (clip: every gradient
rescaled; noclip: nothing to write; amp: GradScaler-scaled gradients
unscaled, checked and clipped; amp-fold: the same with the multiply left to a
fused optimizer), then whole training steps of two small models with and
without clipping. --full runs every scenario (also soft, stats, per-tensor,
value, agc) and implementation (also torch with foreach=False and fusedclip's
fp64 reference).

The candidates take turns call by call; each row is the median of its calls
with their spread. The run samples the machine's load: on a busy machine, or
where a row's calls spread widely, the table says so instead of printing a
speedup. Without a CUDA device the CPU-sized sets run on the CPU, labelled as
CPU numbers. Writes results.json and results.png to --out
(bench/results/local/ in the repository; --publish: bench/results/published/,
the numbers README.md quotes).
"""

BENCH_EPILOG = """\
examples:
  python -m fusedclip bench
  python -m fusedclip bench --full
  python -m fusedclip bench --sets llama-1b,huge --dtype bf16 --scenario clip
  python -m fusedclip bench --device cpu --iters 5 --no-progress --out /tmp/b
"""


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _default_out(publish: bool = False) -> Path:
    if not REPO_RESULTS_DIR.is_dir():
        if publish:
            raise ValueError("--publish writes into the repository's bench/results/: run it "
                             "from the repository root")
        return FALLBACK_RESULTS_DIR
    return PUBLISHED_RESULTS_DIR if publish else LOCAL_RESULTS_DIR


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        prog="python -m fusedclip bench",
        help="run the benchmark",
        description=BENCH_DESCRIPTION,
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--sets",
        type=_csv,
        metavar="A,B",
        help="comma-separated set names (default: the sets meant for the device: llama-1b, "
        "gpt2-small, small-5000, huge on CUDA; llama-tiny, gpt2-tiny, small-500, huge-small, "
        'huge-64m on the CPU; plus sets in --sets-file marked default_on = "any")',
    )
    bench.add_argument(
        "--sets-file",
        type=Path,
        metavar="TOML",
        help=f"TOML file of set definitions added to (and overriding) the built-in ones "
        f"(default: {REPO_SETS_FILE} if it exists here)",
    )
    bench.add_argument(
        "--dtype",
        type=_csv,
        default=["bf16", "fp32"],
        metavar="D,..",
        help="gradient dtypes: bf16, fp32 (default: both)",
    )
    bench.add_argument(
        "--scenario",
        type=_csv,
        metavar="S,..",
        help=f"scenarios (default: {', '.join(measure.HEADLINE_SCENARIOS)}; with --full all: "
        f"{', '.join(measure.DEFAULT_SCENARIOS)}; see bench/README.md)",
    )
    bench.add_argument("--full", action="store_true",
                       help="every scenario and implementation, not just the headline rows")
    bench.add_argument(
        "--train-steps",
        type=int,
        metavar="N",
        help=f"timed training steps per variant (default: {measure.TRAIN_STEPS} in the default "
        "run, none with --full or --sets; 0: none)",
    )
    bench.add_argument(
        "--iters",
        type=int,
        default=measure.DEFAULT_ITERS,
        metavar="N",
        help="timed calls per row, interleaved with the other implementations' (default: "
        "%(default)s)",
    )
    bench.add_argument(
        "--warmup",
        type=int,
        default=measure.DEFAULT_WARMUP,
        metavar="N",
        help="untimed calls before timing (default: %(default)s)",
    )
    bench.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"where results.json and results.png go (default: {LOCAL_RESULTS_DIR} in the "
        f"repository, else ./{FALLBACK_RESULTS_DIR})",
    )
    bench.add_argument(
        "--publish",
        action="store_true",
        help=f"write to {PUBLISHED_RESULTS_DIR}/ (the tracked results README.md quotes), as "
        "<device type>.json and .png",
    )
    bench.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="where to run (default: cuda if available, else cpu)",
    )
    bench.add_argument("--no-progress", action="store_true",
                       help="no progress (a bar in a terminal, else a line per finished set)")
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    registry = dict(sets.BUILTIN_SETS)
    sets_file = args.sets_file
    if sets_file is None and REPO_SETS_FILE.is_file():
        sets_file = REPO_SETS_FILE
    if sets_file is not None:
        registry.update(sets.load_sets(sets_file))
        print(f"sets from {sets_file}", file=sys.stderr)
    device = measure.resolve_device(args.device)
    out = args.out or _default_out(args.publish)
    measure.run(
        sets=args.sets,
        dtypes=args.dtype,
        scenarios=args.scenario,
        iters=args.iters,
        warmup=args.warmup,
        device=device,
        out_dir=out,
        progress=not args.no_progress,
        full=args.full,
        train_steps=args.train_steps,
        json_name=f"{device.type}.json" if args.publish else "results.json",
        registry=registry,
    )
    return 0


def _backends(args: argparse.Namespace) -> int:
    for name, status in _select.available_backends().items():
        print(f"{name}: {status!r}")
    print("auto picks, for dense floating gradients:")
    print(f"  on CPU tensors:  {_select.auto_name({'cpu'})}")
    if torch.cuda.is_available():
        print(f"  on CUDA tensors: {_select.auto_name({'cuda'})}")
    else:
        print("  on CUDA tensors: - (no CUDA device is visible)")
    print("  (sparse and complex gradients: reference)")
    return 0


CHECK_DESCRIPTION = """\
Which backends can run here, and a short self-test of each one that can: clip_grad_norm_
(fp32, bf16, fp16, fp64; 2-, 1-, inf- and 1.5-norms; hard and soft; empty, one-element,
odd, transposed, misaligned and many small gradients) against an fp64 oracle within the
package's tolerances, and clip_grad_value_ against torch bit for bit. Exits 1 if any case
fails. Without a GPU the C++ engine's CPU kernels and the reference run (and Triton
under TRITON_INTERPRET=1).
"""


def _check(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from fusedclip.tools import selfcheck

    for line in selfcheck.environment():
        print(line)
    results = selfcheck.run_check(args.seconds)
    table = Table(title=f"fusedclip self-check ({selfcheck.total_cases()} cases per backend, "
                  f"~{args.seconds:g} s in all)", box=box.SIMPLE)
    for column in ("backend", "device", "result", "cases", "worst error / tolerance", "time"):
        table.add_column(column)
    for r in results:
        if not r.available:
            table.add_row(r.backend, "-", "cannot run here", "", "", "")
            continue
        verdict = "[green]pass[/]" if r.passed else f"[red]FAIL ({len(r.failures)})[/]"
        table.add_row(r.backend, r.device, verdict, str(r.cases), f"{r.worst:.3g}",
                      f"{r.seconds:.1f} s")
    console = Console()
    console.print(table)
    for r in results:
        if not r.available:
            console.print(f"{r.backend}: {r.reason}", highlight=False)
        for failure in r.failures:
            console.print(f"[red]{r.backend}[/]: {failure}", highlight=False)
    return 0 if all(r.passed for r in results if r.available) else 1


TOP_DESCRIPTION = """\
fusedclip: global gradient-norm clipping for PyTorch in two passes over memory.

commands:
  check     which backends run here, and a ~10 s self-test of each against an
            fp64 oracle
  bench     time fusedclip against torch.nn.utils.clip_grad_norm_: the headline
            rows by default (--full for all); table, JSON and plot
  backends  one line per backend (can it run here, and why not), and what auto
            picks

Run `python -m fusedclip COMMAND --help` for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusedclip",
        usage="%(prog)s [-h] COMMAND [options]",
        description=TOP_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The commands are listed in the description (in the order a new user wants them).
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help=argparse.SUPPRESS)
    _add_bench_parser(commands)
    check = commands.add_parser(
        "check",
        prog="python -m fusedclip check",
        help="self-test every backend that runs here",
        description=CHECK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--seconds", type=float, default=10.0, metavar="S",
                       help="time budget for all backends together (default: %(default)s)")
    check.set_defaults(handler=_check)
    commands.add_parser(
        "backends", prog="python -m fusedclip backends",
        help="list the backends, whether each can run here, and what auto picks",
    ).set_defaults(handler=_backends)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
