"""Sweep the Triton backend's run-time variants (FUSEDCLIP_TRITON_VARIANT, docs/performance.md) on
one large gradient set: the norm alone (pass 1: one read) and a clip that scales (passes 1 and
2: three bytes moved per gradient byte), per dtype, as a fraction of the measured copy floor.

    python bench/triton_variants.py                       # bf16 and fp32, 2^28 elements each
    python bench/triton_variants.py --dtypes bfloat16 --numel 1e8 --variants "" "maxnreg=0"

Each variant compiles its own kernels on first use (its warmup). Timings alternate between the
variants round by round (fusedclip.tools.bench.measure.time_interleaved), with L2 flushed.
"""

from __future__ import annotations

import argparse
import os

import torch

import fusedclip
from fusedclip.tools.bench import measure

DEFAULT_VARIANTS = ["", "maxnreg=0", "maxnreg=80", "depth=1", "tile=16384", "tile=16384,depth=1",
                    "warps=4", "persist=0", "persist=8"]


def _sweep(name: str, args: argparse.Namespace, device: torch.device, bandwidth: float) -> None:
    dtype = getattr(torch, name)
    per = int(args.numel) // args.tensors
    grads = [torch.randn(per + 7 * (i % 3), device=device).to(dtype) for i in range(args.tensors)]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    saved = [g.clone() for g in grads]
    params = [torch.empty_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    flush = measure._l2_flusher(device)

    def prepare():
        for g, s in zip(grads, saved):
            g.copy_(s)
        flush()

    def run(variant, what):
        def call():
            os.environ["FUSEDCLIP_TRITON_VARIANT"] = variant
            if what == "norm":
                fusedclip.get_total_norm(grads, 2.0, backend="triton")
            else:
                fusedclip.clip_grad_norm_(params, 1e-3, 2.0, backend="triton")
        return call

    calls = [(f"{w} {v}", run(v, w)) for v in args.variants for w in ("norm", "clip")]
    times = measure.time_interleaved(calls, prepare=prepare, iters=args.iters, warmup=2,
                                     device=device)
    os.environ.pop("FUSEDCLIP_TRITON_VARIANT", None)
    for v in args.variants:
        norm, clip = times[f"norm {v}"].ms_median, times[f"clip {v}"].ms_median
        print(f"{name:9} {v or '(default)':28} {norm:8.3f} {nbytes / bandwidth * 1e3 / norm:8.2f} "
              f"{clip:8.3f} {3 * nbytes / bandwidth * 1e3 / clip:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--numel", type=float, default=2**28, help="elements per set")
    ap.add_argument("--tensors", type=int, default=64, help="tensors the elements are split into")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    bandwidth = measure.copy_bandwidth(device)
    print(f"device {measure._device_name(device)}, copy {bandwidth / 1e9:.0f} GB/s")
    print(f"{'dtype':9} {'variant':28} {'norm ms':>8} {'of floor':>8} {'clip ms':>8} "
          f"{'of floor':>8}")
    for name in args.dtypes:
        _sweep(name, args, device, bandwidth)


if __name__ == "__main__":
    main()
