"""Time every compiled-in variant of the CUDA pass-1 kernel (FUSEDCLIP_CUDA_PASS1: threads per
block and 16-byte loads in flight per thread; csrc/engine/tuning.h) on each set, without a
rebuild: ``fusedclip._C.set_cuda_pass1_variant`` switches between calls.

Each row times pass 1 alone (``get_total_norm`` of the compiled engine: one read, no write) with
the L2 cache flushed before every call; the variants take turns call by call. ``x_floor`` is the
median time over the time one read of the gradients takes at the measured copy bandwidth. Only
p = 2 on fp32, bf16 and fp16 has variants: the other kernels run the default whatever is chosen.

    python bench/variant_sweep.py                         # the default sets, bf16 and fp32
    python bench/variant_sweep.py --sets llama-1b --dtype fp32 --iters 50 --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import fusedclip
from fusedclip.backends.cpp import _lib
from fusedclip.tools.bench import measure, sets

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_SETS = "llama-1b,gpt2-small,small-5000,huge-256m"
EXTRA_SETS = {"huge-256m": sets.ParamSet.of("huge-256m", "one_huge", numel=1 << 28,
                                            description="one 256M")}


def sweep(grads: list[torch.Tensor], variants: list[str], iters: int, warmup: int
          ) -> dict[str, dict[str, float]]:
    C = _lib.module()
    flush = torch.empty(measure.L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    times: dict[str, list[float]] = {v: [] for v in variants}
    norms: dict[str, float] = {}
    for k in range(warmup + iters):
        order = variants[k % len(variants):] + variants[:k % len(variants)]
        for v in order:
            C.set_cuda_pass1_variant(v)
            flush.fill_(0)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            norm = fusedclip.get_total_norm(grads, backend="cpp")
            end.record()
            torch.cuda.synchronize()
            if k >= warmup:
                times[v].append(start.elapsed_time(end))
            norms[v] = float(norm)
    return {v: {"ms": statistics.median(t), "ms_min": min(t), "norm": norms[v]}
            for v, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=DEFAULT_SETS)
    parser.add_argument("--dtype", default="bf16,fp32")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not _lib.loaded() or not _lib.cuda_kernels():
        print("variant_sweep needs a GPU and fusedclip._C with its CUDA kernels")
        return 1
    C = _lib.module()
    variants = list(C.CUDA_PASS1_VARIANTS)
    device = torch.device("cuda")
    bandwidth = measure.copy_bandwidth(device)
    registry = {**sets.BUILTIN_SETS, **EXTRA_SETS}
    rows = []
    print(f"pass-1 variants on {torch.cuda.get_device_name()}, copy {bandwidth / 1e9:.0f} GB/s; "
          f"ms (x the 1-read floor), median of {args.iters}")
    for name in args.sets.split(","):
        for dtype_name in args.dtype.split(","):
            dtype = DTYPES[dtype_name]
            gen = torch.Generator(device="cuda").manual_seed(0)
            grads = [torch.randn(s, dtype=dtype, device="cuda", generator=gen)
                     for s in registry[name].shapes()]
            floor_ms = sum(g.numel() * g.element_size() for g in grads) / bandwidth * 1e3
            result = sweep(grads, variants, args.iters, args.warmup)
            for t in result.values():
                t["x_floor"] = t["ms"] / floor_ms
            best = min(result, key=lambda v: result[v]["ms"])
            same_bits = len({t["norm"] for t in result.values()}) == 1
            rows.append({"set": name, "dtype": dtype_name, "floor_ms": floor_ms, "best": best,
                         "norms_identical": same_bits, "variants": result})
            cells = "  ".join(f"{v} {t['ms']:.3f} ({t['x_floor']:.2f}x)" for v, t in result.items())
            print(f"{name:11} {dtype_name:5} best {best:8} {cells}"
                  f"{'' if same_bits else '  (norms differ in the last bits)'}", flush=True)
            del grads
            torch.cuda.empty_cache()
    C.set_cuda_pass1_variant(variants[0])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth_gbps":
                       bandwidth / 1e9, "iters": args.iters, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
