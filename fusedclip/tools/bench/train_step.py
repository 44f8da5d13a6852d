"""The training-step benchmark: what clipping costs a whole step (forward, backward, clip, fused
AdamW step), measured side by side with the same step without clipping.

Two small decoder models (``MODELS``: a LLaMA-like and a GPT-2-like one, real ``nn.Module``s with
attention and MLPs, sized for a CPU) train with ``torch.optim.AdamW(fused=True)``. Each variant
(``VARIANTS``) owns an identical copy of the model and its optimizer; the variants take turns step
by step, in a rotating order, so that a change in the machine's load falls on all of them alike,
and each step is timed alone (``time.perf_counter`` around it, after a device synchronization on
CUDA). ``max_norm`` is far below the gradients' norm, so every step clips.

Variants:
  none            no clipping: the floor
  torch           torch.nn.utils.clip_grad_norm_ between backward and the step
  fusedclip       fusedclip.clip_grad_norm_ there
  backward        fusedclip.BackwardClipper: partial norms in backward, the coefficient handed to
                  the fused AdamW's step (no pass of its own)
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import fusedclip
from fusedclip.torch_patch import torch_function

__all__ = ["MODELS", "VARIANTS", "TrainStepResult", "as_records", "batches", "build_model",
           "overheads", "run_train_steps", "runner"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    kind: str  # "llama" or "gpt2"
    hidden: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int
    description: str


MODELS: dict[str, ModelSpec] = {
    "llama-tiny": ModelSpec("llama", 256, 4, 4, 8192, 64, 1,
                            "LLaMA-like: RMSNorm, SwiGLU, untied head; 7.3M parameters in 31 "
                            "tensors"),
    "gpt2-tiny": ModelSpec("gpt2", 256, 4, 4, 8192, 64, 1,
                           "GPT-2-like: LayerNorm, GELU MLP, biases, tied head; 5.3M parameters "
                           "in 52 tensors"),
}


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.out = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, h))


class _LlamaBlock(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        inner = 8 * hidden // 3
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.attn = _Attention(hidden, heads, bias=False)
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        y = self.norm2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class _Gpt2Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = _Attention(hidden, heads, bias=True)
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.proj(F.gelu(self.fc(self.norm2(x))))


class _Decoder(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        llama = spec.kind == "llama"
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.pos = None if llama else nn.Embedding(spec.seq, spec.hidden)
        block = _LlamaBlock if llama else _Gpt2Block
        self.blocks = nn.ModuleList(block(spec.hidden, spec.heads) for _ in range(spec.layers))
        self.norm = nn.RMSNorm(spec.hidden) if llama else nn.LayerNorm(spec.hidden)
        self.head = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if not llama:
            self.head.weight = self.embed.weight  # tied, as GPT-2's

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model(name: str, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Decoder(MODELS[name]).to(device)


def batches(model: str, device: str | torch.device, count: int, seed: int) -> list[Tensor]:
    """``count`` batches of token ids for ``model`` (inputs and next-token targets in one)."""
    spec = MODELS[model]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, spec.vocab, (spec.batch, spec.seq + 1), generator=gen).to(device)
            for _ in range(count)]


@dataclasses.dataclass
class _Runner:
    """One variant's model, optimizer and clipping, stepping on its own copy of the model."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    clip: Callable[[], object]
    clipper: fusedclip.BackwardClipper | None = None

    def step(self, batch: Tensor) -> None:
        logits = self.model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        self.clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.clipper is not None:
            self.clipper.remove()


VARIANTS = ("none", "torch", "fusedclip", "backward")


def runner(variant: str, model_name: str, device: str, max_norm: float) -> _Runner:
    """``variant``'s own copy of ``model_name`` with fused AdamW and its clipping."""
    model = build_model(model_name, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    params = list(model.parameters())
    if variant == "none":
        return _Runner(variant, model, opt, lambda: None)
    if variant == "torch":
        clip = torch_function("clip_grad_norm_")
        return _Runner(variant, model, opt, lambda: clip(params, max_norm))
    if variant == "fusedclip":
        return _Runner(variant, model, opt, lambda: fusedclip.clip_grad_norm_(params, max_norm))
    if variant == "backward":
        clipper = fusedclip.BackwardClipper(model, max_norm, optimizer=opt)
        return _Runner(variant, model, opt, lambda: None, clipper)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


@dataclasses.dataclass(frozen=True)
class TrainStepResult:
    """One (model, variant): its step times (seconds, in the order taken) and summary."""

    model: str
    variant: str
    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(p75 - p25) / median of the step times: how much the machine moved under them."""
        if len(self.times) < 4:
            return 0.0
        q = statistics.quantiles(self.times, n=4)
        return (q[2] - q[0]) / self.median


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_train_steps(
    models: Sequence[str] = tuple(MODELS),
    variants: Sequence[str] = VARIANTS,
    device: str = "cpu",
    steps: int = 30,
    warmup: int = 3,
    max_norm: float = 1e-3,
    progress: Callable[[str], None] | None = None,
) -> list[TrainStepResult]:
    """Every variant's step times on every model, the variants interleaved step by step."""
    results = []
    for model_name in models:
        runners = [runner(v, model_name, device, max_norm) for v in variants]
        times: dict[str, list[float]] = {v: [] for v in variants}
        for k, batch in enumerate(batches(model_name, device, warmup + steps, seed=1)):
            # A rotating order: no variant always runs right after the same one.
            for r in runners[k % len(runners):] + runners[:k % len(runners)]:
                _sync(device)
                start = time.perf_counter()
                r.step(batch)
                _sync(device)
                if k >= warmup:
                    times[r.name].append(time.perf_counter() - start)
        for r in runners:
            r.close()
        results += [TrainStepResult(model_name, v, tuple(times[v])) for v in variants]
        if progress is not None:
            progress(model_name)
    return results


def overheads(results: Sequence[TrainStepResult]) -> dict[tuple[str, str], float]:
    """Each (model, variant)'s median step time over the unclipped one's ("none")."""
    base = {r.model: r.median for r in results if r.variant == "none"}
    return {(r.model, r.variant): r.median / base[r.model] for r in results
            if r.model in base and not math.isnan(r.median)}


def as_records(results: Sequence[TrainStepResult]) -> list[dict]:
    """The results as JSON-ready dicts (every step time kept)."""
    ratio = overheads(results)
    return [{"model": r.model, "variant": r.variant, "median_s": r.median, "spread": r.spread,
             "x_none": ratio.get((r.model, r.variant)), "times_s": list(r.times),
             "description": MODELS[r.model].description} for r in results]
