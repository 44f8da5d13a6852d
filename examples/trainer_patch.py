"""HF ``transformers.Trainer`` clipping through fusedclip without changing its code:
``fusedclip.patch()`` routes ``torch.nn.utils.clip_grad_norm_`` (which accelerate calls for
``max_grad_norm``) and the other clipping functions through fusedclip.

    pip install transformers accelerate
    python examples/trainer_patch.py

A tiny GPT-2 with random weights trains for a few steps on random tokens: no downloads. Lightning
(``Trainer(gradient_clip_val=...)``) works the same way. Call ``fusedclip.patch()`` before
importing code that does ``from torch.nn.utils import clip_grad_norm_``; or use
``with fusedclip.patched(): ...`` around the training call.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import fusedclip

MAX_GRAD_NORM = 1.0


class AfterClipping(transformers.TrainerCallback):
    """The gradients' norm after clipping, before each optimizer step, and whether torch's clip
    was fusedclip's then (only to show it: nothing here is needed to clip with fusedclip)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.patched: list[bool] = []
        self.backend = ""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))
        self.patched.append(fusedclip.is_patched())
        self.backend = fusedclip.select_backend(grads)


def main(steps: int = 5) -> float:
    fusedclip.patch()  # torch.nn.utils.clip_grad_norm_ is fusedclip's from here on
    try:
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2,
                                         n_head=2)
        model = transformers.GPT2LMHeadModel(config)
        tokens = torch.randint(0, 128, (64, 32))
        data = [{"input_ids": t, "labels": t} for t in tokens]
        after = AfterClipping()
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(
                output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
                max_grad_norm=MAX_GRAD_NORM, logging_steps=1, report_to=[], save_strategy="no",
                disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
            )
            trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                           callbacks=[after])
            result = trainer.train()
    finally:
        fusedclip.unpatch()
    # The norm before clipping, as clip_grad_norm_ (fusedclip's) returned it to the Trainer.
    before = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    for step, (b, a) in enumerate(zip(before, after.norms), 1):
        print(f"step {step}: grad norm {b:.4f} -> {a:.4f} (max_grad_norm {MAX_GRAD_NORM})")
    clipped = sum(b > MAX_GRAD_NORM for b in before)
    print(f"trained {steps} steps with fusedclip doing the clipping (patched at "
          f"{sum(after.patched)} of {steps} steps, backend {after.backend}; clipped {clipped} "
          f"of {steps} steps): loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    main(parser.parse_args().steps)
