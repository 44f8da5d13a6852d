"""Command line: ``python -m fusedclip bench`` and ``python -m fusedclip backends``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fusedclip import benchmark, param_sets
from fusedclip.backends import available_backends

# Defaults that depend on where the command runs: the repository's bench/ folder when it is there.
REPO_SETS_FILE = Path("bench/sets.toml")
REPO_RESULTS_DIR = Path("bench/results")
FALLBACK_RESULTS_DIR = Path("fusedclip-bench")

BENCH_DESCRIPTION = """\
Time fusedclip's clip_grad_norm_ backends against torch.nn.utils.clip_grad_norm_
(foreach=True and foreach=False) on named parameter sets, in bf16 and fp32, with
clipping active ("clip") and inactive ("noclip"). Each time is compared with a
memory floor: the time needed just to move the gradient bytes at this device's
measured copy bandwidth. Writes results.json and results.png to --out and prints
a table. Without a CUDA device the CPU-sized sets run on the CPU and the results
are marked as CPU numbers.
"""

BENCH_EPILOG = """\
examples:
  python -m fusedclip bench
  python -m fusedclip bench --sets llama-1b,huge --dtype bf16 --scenario clip
  python -m fusedclip bench --device cpu --iters 5 --no-progress --out /tmp/bench
"""


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _default_out() -> Path:
    return REPO_RESULTS_DIR if REPO_RESULTS_DIR.is_dir() else FALLBACK_RESULTS_DIR


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
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
        "gpt2-small, small-5000, huge on CUDA; llama-tiny, gpt2-tiny, small-500, huge-small on "
        'the CPU; plus sets in --sets-file marked default_on = "any")',
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
        default=list(benchmark.DEFAULT_SCENARIOS),
        metavar="S,..",
        help="clip: max_norm = 0.1 x the norm, so gradients are rescaled; noclip: max_norm = "
        "10 x the norm; amp: GradScaler-scaled gradients unscaled, checked and clipped (torch: "
        "scaler.unscale_ + clip_grad_norm_); amp-fold: the same with the multiply handed to a "
        "fused AdamW; soft, stats, per-tensor, value, agc: the other clipping modes against "
        "their unfused torch equivalents (default: all)",
    )
    bench.add_argument(
        "--iters",
        type=int,
        default=benchmark.DEFAULT_ITERS,
        metavar="N",
        help="timed calls per row; the median and min are reported (default: %(default)s)",
    )
    bench.add_argument(
        "--warmup",
        type=int,
        default=benchmark.DEFAULT_WARMUP,
        metavar="N",
        help="untimed calls before timing (default: %(default)s)",
    )
    bench.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"where results.json and results.png go (default: {REPO_RESULTS_DIR} if it "
        f"exists here, else ./{FALLBACK_RESULTS_DIR})",
    )
    bench.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="where to run (default: cuda if available, else cpu)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    registry = dict(param_sets.BUILTIN_SETS)
    sets_file = args.sets_file
    if sets_file is None and REPO_SETS_FILE.is_file():
        sets_file = REPO_SETS_FILE
    if sets_file is not None:
        registry.update(param_sets.load_sets(sets_file))
        print(f"sets from {sets_file}", file=sys.stderr)
    benchmark.run(
        sets=args.sets,
        dtypes=args.dtype,
        scenarios=args.scenario,
        iters=args.iters,
        warmup=args.warmup,
        device=args.device,
        out_dir=args.out or _default_out(),
        progress=not args.no_progress,
        registry=registry,
    )
    return 0


def _backends(args: argparse.Namespace) -> int:
    for name, status in available_backends().items():
        print(f"{name}: {status!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusedclip",
        description="fusedclip: fused global gradient-norm clipping. Subcommands below.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench_parser(commands)
    backends = commands.add_parser(
        "backends", help="list the backends and whether each can run here"
    )
    backends.set_defaults(handler=_backends)
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
