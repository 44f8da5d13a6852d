"""Reading the CUDA kernels' machine code (SASS) without a GPU: cuobjdump's disassembly of a cubin
or of the fatbinary in fusedclip._C, split by kernel, and how many 16-byte loads each kernel's
threads have in flight before they use the first of them.

Also a command: ``python tests/sass.py FILE [NAME_FRAGMENT]`` prints, per kernel, the registers
ptxas gave it and its longest run of 16-byte loads issued before their first use.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

# A 16-byte global load (LDG.E.128 with any cache qualifier) and its destination register.
_LDG128 = re.compile(r"\bLDG\.E\.128(?:\.[A-Z0-9]+)*\s+R(\d+)\s*,")
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_REG = re.compile(r"\bR(\d+)\b")


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, CUDA_HOME, or the copy the Triton wheel ships (the CUDA toolkit in some
    images has none)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "cuobjdump")):
            return os.path.join(root, "bin", "cuobjdump")
    for path in sys.path:
        hits = glob.glob(os.path.join(path, "triton", "backends", "nvidia", "bin", "cuobjdump"))
        if hits:
            return hits[0]
    return None


def kernels(path: str, cuobjdump: str) -> dict[str, list[str]]:
    """Every kernel's SASS instruction lines in ``path`` (a cubin, or a shared library holding a
    fatbinary), by mangled name."""
    text = subprocess.run([cuobjdump, "-sass", path], check=True, capture_output=True,
                          text=True).stdout
    out: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        if "Function :" in line:
            name = line.split("Function :", 1)[1].strip()
            out[name] = []
        elif name is not None and _OPCODE.match(line):
            out[name].append(line)
    return out


def loads_in_flight(lines: list[str]) -> list[int]:
    """The lengths of the runs of 16-byte loads issued before any of them is used, in program
    order. A run ends at the first instruction (other than another such load) that reads a register
    one of its loads writes; a run of 4 means each thread has 4 x 16 bytes in flight there."""
    runs: list[int] = []
    pending: set[int] = set()
    count = 0
    for line in lines:
        load = _LDG128.search(line)
        if load:
            base = int(load.group(1))
            pending.update(range(base, base + 4))
            count += 1
            continue
        if not count:
            continue
        m = _OPCODE.match(line)
        operands = m.group(2) if m else ""
        if any(int(r) in pending for r in _REG.findall(operands)):
            runs.append(count)
            pending.clear()
            count = 0
    if count:
        runs.append(count)
    return runs


def main(argv: list[str]) -> int:
    tool = find_cuobjdump()
    if tool is None:
        print("cuobjdump not found (PATH, CUDA_HOME/bin, triton/backends/nvidia/bin)")
        return 1
    fragment = argv[2] if len(argv) > 2 else ""
    for name, lines in kernels(argv[1], tool).items():
        if fragment in name:
            runs = loads_in_flight(lines)
            print(f"{max(runs, default=0):3d} max, runs {runs[:12]}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
