"""The benchmark's reporting half: the table, the JSON file and the plot of ``measure.run``'s
results."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["default_console", "plot", "print_table", "write_results"]


def default_console() -> Any:
    """A rich console on stdout (the table is made to fit 80 columns, terminal or not)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log or a pipe: never narrower than the table
        console = Console(width=max(console.width, 80))
    return console


def write_results(results: dict[str, Any], out_dir: Path, json_name: str) -> tuple[Path, Path]:
    """Write the JSON and the PNG plot; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / json_name
    png_path = json_path.with_suffix(".png")
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path)
    return json_path, png_path


def _title(meta: Mapping[str, Any]) -> str:
    title = f"fusedclip clip_grad_norm_ on {meta['device']}"
    return f"{title} (CPU NUMBERS, NOT GPU NUMBERS)" if meta["cpu_numbers"] else title


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def warnings_of(results: Mapping[str, Any]) -> list[str]:
    """Why the run's speedups should not be read as facts: a busy machine, noisy rows."""
    out = []
    load = results.get("load") or {}
    for reason in load.get("busy", []):
        out.append(f"the machine was busy ({reason}): times are not reliable; rerun on an idle "
                   "machine")
    if load and not load.get("readable", True):
        out.append("the machine's load could not be read here (no /proc): idle is assumed")
    noisy = [r for r in results["rows"] if r.get("noisy")]
    if noisy:
        limit = results["metadata"].get("noisy_spread", 0.15)
        out.append(f"{len(noisy)} of {len(results['rows'])} rows spread over {limit:.0%} "
                   "between calls: marked 'noisy' instead of a speedup")
    return out


def print_table(results: Mapping[str, Any], console: Any) -> None:
    """The rows in 80 columns (details in the JSON and the plot), then the training steps, what
    was skipped, what failed, and any warning about the machine's load."""
    from rich import box
    from rich.table import Table

    meta = results["metadata"]
    title = _title(meta)
    if meta["cpu_numbers"]:
        title = f"[bold red]{title}[/]"
    warnings = warnings_of(results)
    for line in warnings:
        console.print(f"[bold yellow]warning:[/] {line}")
    scenarios = list(dict.fromkeys(r["scenario"] for r in results["rows"]))
    floors = ", ".join(f"{scenario} {meta['floor_passes'][scenario]}x" for scenario in scenarios)
    caption = (f"median of {meta['iters']} interleaved calls; ±: spread (p75-p25)/median; floor: "
               f"gradient bytes x passes ({floors}) at {meta['copy_bandwidth_gbps']:.1f} GB/s")
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False)
    for header in ("set", "dtype", "scenario", "impl"):
        table.add_column(header)
    for header in ("ms", "±", "x floor", f"vs {meta['baseline']}"):
        table.add_column(header, justify="right")
    previous_group = None
    for r in results["rows"]:
        group = (r["set"], r["dtype"], r["scenario"])
        if previous_group is not None and group != previous_group:
            table.add_section()
        previous_group = group
        speedup = _fmt(r["speedup_vs_torch"], ".2f")
        if r.get("noisy") and r["implementation"] != meta["baseline"]:
            speedup = "noisy"
        table.add_row(*group, r["implementation"], f"{r['ms_median']:.3f}",
                      f"{r.get('spread', 0.0):.0%}", f"{r['ratio_to_floor']:.2f}", speedup)
    console.print(table)
    names = list(dict.fromkeys(r["implementation"] for r in results["rows"]))
    for name in names:
        console.print(f"  {name}: {meta['implementations'].get(name, name)}", soft_wrap=False)
    if results.get("train_step"):
        console.print(format_train_steps(results["train_step"]))
    for s in results["skipped"]:
        console.print(f"skipped {s['implementation']}: {s['reason']}")
    for e in results["errors"]:
        where = f"{e['set']} {e['dtype']} {e['scenario']}"
        console.print(f"[red]error[/] {e['implementation']} on {where}: {e['error']}")


def format_train_steps(records: list[Mapping[str, Any]]) -> str:
    """The training-step rows: median step time, spread, and the ratio to no clipping."""
    lines = ["training step (forward, backward, clip, fused AdamW), interleaved:",
             f"{'model':11} {'variant':10} {'step ms':>8} {'±':>5} {'x none':>7}"]
    for r in records:
        ratio = "-" if r["x_none"] is None else f"{r['x_none']:.3f}"
        lines.append(f"{r['model']:11} {r['variant']:10} {r['median_s'] * 1e3:8.2f} "
                     f"{r['spread']:5.0%} {ratio:>7}")
    return "\n".join(lines)


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Grouped bars of ``ratio_to_floor`` per (set, dtype, scenario), one bar per implementation."""
    # The object-oriented Agg API leaves pyplot's global backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = results["rows"]
    groups = list(dict.fromkeys((r["set"], r["dtype"], r["scenario"]) for r in rows))
    impls = list(dict.fromkeys(r["implementation"] for r in rows))
    ratio = {
        (r["set"], r["dtype"], r["scenario"], r["implementation"]): r["ratio_to_floor"]
        for r in rows
    }

    fig = Figure(figsize=(max(8.0, 0.9 * len(groups) + 2), 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs = [g for g, key in enumerate(groups) if (*key, impl) in ratio]
        ys = [ratio[(*groups[g], impl)] for g in xs]
        ax.bar([x + (i - (len(impls) - 1) / 2) * width for x in xs], ys, width, label=impl)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="memory floor")
    ax.set_xticks(range(len(groups)), [f"{s}\n{d} {c}" for s, d, c in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time / memory floor (lower is better, log scale)")
    ax.set_title(_title(results["metadata"]), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.savefig(path, dpi=120)
