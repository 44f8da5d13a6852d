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

MAX_NORM = 0.25  # below this model's gradient norm (about 0.4 at first): clipping is active


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
    clipped = torch.zeros((), dtype=torch.int64, device=device)  # steps whose norm was over
    for step in range(steps):
        with torch.autocast(device, dtype=amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        # Instead of scaler.unscale_(optimizer) + torch.nn.utils.clip_grad_norm_(...):
        norm = fusedclip.clip_grad_norm_(model.parameters(), MAX_NORM, scaler=scaler,
                                         optimizer=optimizer)
        clipped += norm > MAX_NORM  # the unscaled norm before clipping; no host sync
        if step == steps - 1:  # what the optimizer sees: unscaled and clipped (only to show it)
            after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print(f"{device}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps; last grad norm "
          f"{norm.item():.4f} -> {after.item():.4f} (max_norm {MAX_NORM}); clipped "
          f"{clipped.item()} of {steps} steps; loss scale {scaler.get_scale():.0f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", choices=("cuda", "cpu"))
    args = parser.parse_args()
    main(args.steps, args.device)
