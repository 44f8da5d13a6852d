"""The benchmark's reporting half: the table, the JSON file and the plot of ``measure.run``'s
results."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["default_console", "plot", "print_table", "write_results"]


def default_console() -> Any:
    """A rich console on stdout, wide enough for the table when it is not a terminal."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough that no column is cut short
        console = Console(width=max(console.width, 150))
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


def print_table(results: Mapping[str, Any], console: Any) -> None:
    """One rich table of all rows, titled with the device."""
    from rich import box
    from rich.table import Table

    meta = results["metadata"]
    title = _title(meta)
    if meta["cpu_numbers"]:
        title = f"[bold red]{title}[/]"
    floors = " / ".join(f"{n}x ({scenario})" for scenario, n in meta["floor_passes"].items())
    caption = (
        f"median (min) of {meta['iters']} calls after {meta['warmup']} warmup; floor = {floors} "
        f"gradient bytes at the measured copy bandwidth of {meta['copy_bandwidth_gbps']:.1f} GB/s"
    )
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD)
    for header in ("set", "dtype", "scenario", "implementation"):
        table.add_column(header)
    for header in ("ms median", "ms min", "host µs", "GB/s", "x floor", f"vs {meta['baseline']}"):
        table.add_column(header, justify="right")
    previous_group = None
    for r in results["rows"]:
        group = (r["set"], r["dtype"], r["scenario"])
        if previous_group is not None and group != previous_group:
            table.add_section()
        previous_group = group
        table.add_row(
            *group,
            r["implementation"],
            f"{r['ms_median']:.3f}",
            f"{r['ms_min']:.3f}",
            f"{r['host_us']:.0f}",
            f"{r['gbps']:.1f}",
            f"{r['ratio_to_floor']:.2f}",
            _fmt(r["speedup_vs_torch_foreach"], ".2f"),
        )
    console.print(table)
    for s in results["skipped"]:
        console.print(f"skipped {s['implementation']}: {s['reason']}")
    for e in results["errors"]:
        where = f"{e['set']} {e['dtype']} {e['scenario']}"
        console.print(f"[red]error[/] {e['implementation']} on {where}: {e['error']}")


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
