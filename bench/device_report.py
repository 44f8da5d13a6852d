"""The tables of bench/device_check.sh, from what its stages left behind (no torch, no GPU).

    python bench/device_report.py ptxas BUILD_LOG           per kernel: registers, spills
    python bench/device_report.py merge-bench OUT JSON...   the benchmark runs as one results file
    python bench/device_report.py ncu-table CSV [LOG]       one line per profiled kernel
    python bench/device_report.py summary STAGES_TSV OUT S  the table printed last
    python bench/device_report.py stub STAGE DIR            DRY_RUN: what STAGE's GPU commands
                                                            would have left in DIR

Each table is short enough to read in a tool's last 12,000 characters of output.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# ncu metrics (raw page names) and the short column each becomes.
NCU_COLUMNS = {
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram%",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occ%",
    "lts__t_sector_hit_rate.pct": "L2hit%",
    "gpu__time_duration.sum": "time",
}
_STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return names
    run = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = run.stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str) -> str:
    """A demangled kernel name without namespaces and the argument list."""
    name = re.sub(r"fusedclip::(\(anonymous namespace\)::)?", "", name)
    name = name.replace("c10::", "").replace("(NormKind)", "K").replace("void ", "")
    return re.sub(r"\(.*\)$", "", name)


def ptxas(log: str) -> int:
    """Pairs ptxas' "Compiling entry function" lines with their register and spill lines."""
    rows, entry, spill = [], None, ""
    for line in Path(log).read_text(errors="replace").splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            entry, spill = m.group(1), ""
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and (m.group(1) != "0" or m.group(2) != "0"):
            spill = f"{m.group(1)}/{m.group(2)}"
        m = re.search(r"Used (\d+) registers", line)
        if m and entry:
            rows.append((entry, int(m.group(1)), spill))
            entry = None
    names = _demangle([r[0] for r in rows])
    print(f"ptxas report: {len(rows)} kernels; spills are stores/loads in bytes")
    print(f"{'regs':>4} {'spill':>7}  kernel")
    for (_, regs, spill), name in sorted(zip(rows, names), key=lambda x: _short(x[1])):
        print(f"{regs:4d} {spill or '-':>7}  {_short(name)}")
    return 0


def merge_bench(out: str, paths: list[str]) -> int:
    merged: dict = {"metadata": None, "rows": [], "errors": [], "runs": []}
    for path in paths:
        if not Path(path).is_file():
            continue
        run = json.loads(Path(path).read_text())
        merged["metadata"] = merged["metadata"] or run.get("metadata")
        merged["runs"].append(run.get("metadata"))
        merged["rows"] += run.get("rows", [])
        merged["errors"] += run.get("errors", [])
    Path(out).write_text(json.dumps(merged, indent=1))
    return 0 if merged["rows"] else 1


def bench_table(path: Path) -> list[str]:
    if not path.is_file():
        return [f"(no {path.name})"]
    r = json.loads(path.read_text())
    m = r.get("metadata") or {}
    lines = [f"{m.get('device', '?')} | torch {m.get('torch_version', '?')} | copy "
             f"{m.get('copy_bandwidth_gbps', float('nan')):.0f} GB/s (the floor's bandwidth)",
             f"{'set':11} {'dtype':5} {'scenario':9} {'impl':7} {'ms':>8} {'host us':>8} "
             f"{'x floor':>7} {'vs torch':>8}"]
    for x in r.get("rows", []):
        s = x.get("speedup_vs_torch_foreach")
        lines.append(f"{x['set']:11} {x['dtype']:5} {x['scenario']:9} {x['implementation']:7} "
                     f"{x['ms_median']:8.3f} {x.get('host_us', float('nan')):8.1f} "
                     f"{x['ratio_to_floor']:7.2f} {'-' if s is None else f'{s:.2f}':>8}")
    for e in r.get("errors", []):
        lines.append(f"error: {e.get('implementation')} {e.get('set')} {e.get('dtype')} "
                     f"{e.get('scenario')}: {str(e.get('error'))[:160]}")
    return lines


def _ncu_rows(path: str) -> list[dict[str, str]]:
    text = Path(path).read_text(errors="replace") if Path(path).is_file() else ""
    start = text.find('"ID"')
    if start < 0:
        return []
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    return [r for r in rows if r.get("ID", "").isdigit()]  # drop the units row


def ncu_table(path: str, cases_log: str | None = None) -> int:
    """One line per kernel: case, kernel, DRAM %, achieved occupancy, L2 hit rate, top 3 stalls.
    The cases come from ncu_cases.py's log (one "case NAME" line per profiled clip, in order); a
    case's kernels are its pass-1 launches followed by its pass-2 launches."""
    rows = _ncu_rows(path)
    cases = []
    if cases_log and Path(cases_log).is_file():
        cases = [line.split()[1] for line in Path(cases_log).read_text().splitlines()
                 if line.startswith("case ")]
    print(f"ncu: {len(rows)} kernels profiled (--clock-control none); stalls in cycles per issued "
          "instruction")
    print(f"{'case':15} {'kernel':26} {'dram%':>6} {'occ%':>5} {'L2hit%':>6} {'time':>9}  "
          "top stalls")
    case_i, last = -1, "scale"
    for r in rows:
        kernel = _short(r.get("Kernel Name", r.get("Function Name", "?")))
        kind = "norm" if "norm_kernel" in kernel else "scale"
        if kind == "norm" and last == "scale":
            case_i += 1
        last = kind
        case = cases[case_i] if 0 <= case_i < len(cases) else f"#{case_i}"
        stalls = sorted(((float(v or 0), m.group(1)) for k, v in r.items()
                         if (m := _STALL.match(k)) and _is_number(v)), reverse=True)[:3]
        vals = {c: r.get(k, "") for k, c in NCU_COLUMNS.items()}
        print(f"{case:15} {kernel[:26]:26} {vals['dram%']:>6} {vals['occ%']:>5} "
              f"{vals['L2hit%']:>6} {vals['time']:>9}  "
              + ", ".join(f"{name} {v:.1f}" for v, name in stalls))
    return 0 if rows else 1


def _is_number(v: str | None) -> bool:
    try:
        float(v or "")
    except ValueError:
        return False
    return True


def variants_table(path: Path) -> list[str]:
    if not path.is_file():
        return [f"(no {path.name})"]
    r = json.loads(path.read_text())
    lines = [f"pass-1 variants (FUSEDCLIP_CUDA_PASS1), ms of pass 1 alone and x its 1-read floor "
             f"({r.get('device', '?')}):"]
    for row in r.get("rows", []):
        cells = "  ".join(f"{v} {t['ms']:.3f} ({t['x_floor']:.2f}x)"
                          for v, t in row["variants"].items())
        lines.append(f"  {row['set']:11} {row['dtype']:5} best {row['best']:8} {cells}")
    return lines


def _tail_match(path: Path, pattern: str, n: int = 2) -> list[str]:
    if not path.is_file():
        return []
    hits = [line for line in path.read_text(errors="replace").splitlines()
            if re.search(pattern, line)]
    return hits[-n:]


def summary(stages_tsv: str, out: str, seconds: str) -> int:
    out_dir = Path(out)
    dry = " (DRY_RUN: every GPU command was a stub)" if os.environ.get("DRY_RUN") == "1" else ""
    print(f"=== fusedclip device check{dry}: {seconds} s in all; files in {out}: "
          f"{len([p for p in out_dir.iterdir() if p.is_file()]) + 1} (summary.txt included)")
    notes = {
        "build": _tail_match(out_dir / "ptxas.txt", r"ptxas report|build failed", 2),
        "tests": _tail_match(out_dir / "tests.log", r"(passed|failed|error)[^=]* in [\d.]+s", 3),
        "sanitizer": _tail_match(out_dir / "sanitizer.log", r"ERROR SUMMARY|passed|failed", 6),
        "check": _tail_match(out_dir / "tests.log", r"\b(pass|FAIL)\b", 4),
    }
    print(f"{'stage':10} {'status':11} {'s':>4} {'limit':>5}  result")
    for line in Path(stages_tsv).read_text().splitlines():
        stage, status, took, limit, why = (line.split("\t") + [""] * 5)[:5]
        note = why or "; ".join(s.strip()[:90] for s in notes.get(stage, [])[:1])
        print(f"{stage:10} {status:11} {took:>4} {limit:>5}  {note}")
    for stage in ("tests", "check", "sanitizer"):
        for s in notes[stage][1:]:
            print(f"  {stage}: {s.strip()[:110]}")
    print()
    print("\n".join(bench_table(out_dir / "bench.json")))
    print()
    print("\n".join(variants_table(out_dir / "variants.json")))
    ncu = out_dir / "ncu.txt"
    if ncu.is_file():
        print()
        lines = ncu.read_text(errors="replace").splitlines()
        print("\n".join(lines[:lines.index("") if "" in lines else 12][:16]))
    return 0


def stub(stage: str, work: str) -> int:
    """DRY_RUN: the files the real commands of ``stage`` would leave in ``work``."""
    w = Path(work)
    if stage == "build":
        (w / "build.log").write_text(
            "ptxas info    : Compiling entry function '_Z4stubv' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z4stubv\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
            "ptxas info    : Used 32 registers, used 1 barriers\n")
    elif stage == "bench":
        for name in ("llama", "bf16"):
            (w / f"bench-{name}").mkdir(exist_ok=True)
            row = {"set": "stub", "dtype": "bf16", "scenario": "clip", "implementation": "cpp",
                   "ms_median": 1.0, "host_us": 10.0, "ratio_to_floor": 1.05,
                   "speedup_vs_torch_foreach": 2.0}
            (w / f"bench-{name}" / "results.json").write_text(json.dumps({
                "metadata": {"device": "stub", "torch_version": "0", "copy_bandwidth_gbps": 1.0},
                "rows": [row], "errors": []}))
    elif stage == "ncu":
        (w / "ncu.csv").write_text(
            '"ID","Kernel Name","dram__throughput.avg.pct_of_peak_sustained_elapsed",'
            '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"\n'
            '"","","%","ratio"\n"0","norm_kernel<float>","90.0","5.0"\n'
            '"1","scale_kernel<float>","88.0","4.0"\n')
        (w / "ncu-cases.log").write_text("case stub-case\n")
    elif stage == "variants":
        (w / "variants.json").write_text(json.dumps({"device": "stub", "rows": [
            {"set": "stub", "dtype": "bf16", "best": "t512u4",
             "variants": {"t512u4": {"ms": 1.0, "x_floor": 1.1}}}]}))
    return 0


def main(argv: list[str]) -> int:
    command, args = argv[1], argv[2:]
    if command == "ptxas":
        return ptxas(args[0])
    if command == "merge-bench":
        return merge_bench(args[0], args[1:])
    if command == "ncu-table":
        return ncu_table(args[0], args[1] if len(args) > 1 else None)
    if command == "summary":
        return summary(*args)
    if command == "stub":
        return stub(*args)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
