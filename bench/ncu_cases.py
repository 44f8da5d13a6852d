"""The clips that bench/device_check.sh profiles with Nsight Compute: one ``clip_grad_norm_`` of the
compiled engine per case, with ``max_norm`` at 0.1x the norm so that pass 2 runs too, between
``cudaProfilerStart``/``Stop`` (ncu runs with ``--profile-from-start off``), after one untimed
call that builds and uploads the plan. Prints ``case NAME`` before each profiled call: the ncu
table (device_report.py ncu-table) names a case's kernels by those lines.

    ncu --profile-from-start off -k regex:'norm_kernel|scale_kernel' ... python bench/ncu_cases.py
"""

from __future__ import annotations

import argparse
import sys

import torch

import fusedclip
from fusedclip.tools.bench import sets

CASES = (("llama-1b", torch.bfloat16), ("llama-1b", torch.float32), ("small-5000", torch.bfloat16))


def params_of(name: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for shape in sets.BUILTIN_SETS[name].shapes():
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="cuda"))
        p.grad = torch.randn(shape, dtype=dtype, device="cuda", generator=gen)
        params.append(p)
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpp")
    args = parser.parse_args()
    for name, dtype in CASES:
        params = params_of(name, dtype)
        norm = float(fusedclip.get_total_norm([p.grad for p in params], backend=args.backend))
        fusedclip.clip_grad_norm_(params, 0.1 * norm, backend=args.backend)  # plan, upload
        torch.cuda.synchronize()
        label = f"{name}-{str(dtype).removeprefix('torch.')}"
        print(f"case {label} ({len(params)} tensors)", flush=True)
        torch.cuda.profiler.start()
        fusedclip.clip_grad_norm_(params, 0.1 * norm, backend=args.backend)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        del params
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
