"""Gradient factories for the tests: parameters whose ``.grad`` is random (never all zeros) in many
shapes, layouts and dtypes."""

from __future__ import annotations

import math

import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NORM_TYPES = [1.0, 2.0, math.inf, 0.5, 1.5, 3.0]

SHAPE_CLASSES: dict[str, list[tuple[int, ...]]] = {
    "single": [(37, 11)],
    "several": [(64, 32), (32,), (7, 3, 5), (1000,)],
    "tiny_and_empty": [(0,), (1,), (3, 0), (1, 1), (5,), (0, 4)],
    "odd_sizes": [(1,), (3,), (17,), (255,), (257,), (4099,), (65537,)],
    "many": [(n % 37,) for n in range(2000)],
}


def make_params(
    shapes, dtype=torch.float32, device="cpu", seed=0, *, layout="contiguous", none_every=0
) -> list[torch.Tensor]:
    """Leaf parameters whose ``.grad`` is random normal (never all zeros).

    layout: "contiguous"; "transposed" (grads are transposes of contiguous storage, so permuted
    strides); "strided" (grads are every-other-column views with gaps); "offset" (grads start one
    element into their storage, so their data pointer is misaligned).
    none_every: every n-th parameter gets no gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        params.append(p)
        if none_every and i % none_every == none_every - 1:
            continue
        p.grad = _grad_like(p, gen, layout)
    return params


def _grad_like(p: torch.Tensor, gen: torch.Generator, layout: str) -> torch.Tensor:
    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)

    shape = tuple(p.shape)
    if layout == "contiguous" or p.dim() == 0:
        return rand(*shape)
    if layout == "transposed" and p.dim() >= 2:
        return rand(*reversed(shape)).permute(*reversed(range(p.dim())))
    if layout == "strided":
        return rand(*shape[:-1], shape[-1] * 2)[..., ::2]
    if layout == "offset":
        return rand(p.numel() + 1)[1:].view(shape)
    return rand(*shape)


def random_tensors(sizes, dtype, device="cpu", seed=0, scale=1.0) -> list[torch.Tensor]:
    """One random-normal tensor of each size in ``sizes`` (times ``scale``), made in fp64."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
            for n in sizes]


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Independent copies with the same gradient values, for running a second implementation."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = p.grad.clone()
        out.append(q)
    return out


def grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]
