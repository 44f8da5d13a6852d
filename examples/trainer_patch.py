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


def main(steps: int = 5) -> float:
    fusedclip.patch()  # torch.nn.utils.clip_grad_norm_ is fusedclip's from here on
    try:
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2,
                                         n_head=2)
        model = transformers.GPT2LMHeadModel(config)
        tokens = torch.randint(0, 128, (64, 32))
        data = [{"input_ids": t, "labels": t} for t in tokens]
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(
                output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
                max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
                disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
            )
            trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
            result = trainer.train()
        print(f"trained {steps} steps with fusedclip doing the clipping: "
              f"loss {result.training_loss:.3f}")
        return result.training_loss
    finally:
        fusedclip.unpatch()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    main(parser.parse_args().steps)
