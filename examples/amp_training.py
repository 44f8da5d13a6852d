"""An AMP training loop with fusedclip: one call unscales, checks for inf/NaN, measures and clips.

    python examples/amp_training.py            # CUDA (fp16 autocast) when there is a GPU, else CPU

It replaces torch's recipe

    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)
    scaler.update()

whose unscale and clip read the gradients three times and write them twice, by two passes over
them. ``scaler.step`` still skips the step when the gradients held inf or NaN.
"""

from __future__ import annotations

import argparse

import torch

import fusedclip


def main(steps: int = 20, device: str | None = None) -> list[float]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device)
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    x = torch.randn(256, 64, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        # Instead of scaler.unscale_(optimizer) + torch.nn.utils.clip_grad_norm_(...):
        norm = fusedclip.clip_grad_norm_(model.parameters(), 1.0, scaler=scaler,
                                         optimizer=optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print(f"{device}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, last grad norm {norm.item():.3f}, "
          f"loss scale {scaler.get_scale():.0f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=("cuda", "cpu"))
    args = parser.parse_args()
    main(args.steps, args.device)
