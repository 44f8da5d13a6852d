"""Hypothesis strategies for the differential fuzzer: gradient lists and the arguments of every
public function, as plain data (``Case``, ``Grad``) whose ``repr`` is Python that rebuilds them, so
that a shrunk failure pastes into ``test_regressions.py`` as it is printed.

A ``Grad`` says how to make one gradient: dtype, shape, layout (contiguous, transposed, strided,
offset by a few elements so that its data pointer breaks 16-byte alignment), how its values are
drawn (a seed and a magnitude class: normal, huge, tiny, subnormal, spread over the whole range)
and special values written at given flat positions (inf, NaN, the dtype's largest, smallest
normal and smallest subnormal, signed zeros). A ``Case`` holds the gradients, a way for some of
them to share memory (the same tensor twice, overlapping slices, one buffer read as two dtypes,
an ``expand()``-ed gradient; or interleaved views that share nothing, which are taken) and the
call's arguments.

Sizes: most examples are small; some cross the engines' chunk boundaries (``CHUNK`` elements,
2^16: csrc/engine/table.h kChunkElems and fusedclip/backends/triton/plan.py). ``small=True`` (the
Triton interpreter, a few hundred times slower than the CPU engine) keeps fewer and smaller
tensors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random

import torch
from hypothesis import settings
from hypothesis import strategies as st

CHUNK = 1 << 16  # elements per chunk of the engines' tables

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LAYOUTS = ("contiguous", "transposed", "strided", "offset")
MAGNITUDES = ("normal", "huge", "tiny", "subnormal", "wide", "zero")
SPECIALS = ("inf", "-inf", "nan", "max", "-max", "tiny", "subnormal", "0", "-0")
# Shared-memory layouts: those that share an element are refused; "interleave" shares none.
SHARINGS = ("same", "overlap", "reinterpret", "expand", "interleave")
REFUSED_SHARINGS = ("same", "overlap", "reinterpret", "expand")

# Norm types: the passes' (p > 0, inf) and torch's general ones (0, negative p, -inf).
PASS_NORM_TYPES = (2.0, 1.0, math.inf, 0.5, 3.0, 1.5, 0.01, 0.25, 7.0, 50.0)
GENERAL_NORM_TYPES = (0.0, -1.0, -2.0, -math.inf, -0.5)

# ---- profiles ------------------------------------------------------------------------------------

PROFILE_ENV = "FUSEDCLIP_FUZZ_PROFILE"


def profile_name() -> str:
    return "fusedclip-" + os.environ.get(PROFILE_ENV, "ci")


def examples(backend: str, n: int) -> settings:
    """The settings of one property on one backend: the active profile's (tests/fuzz/conftest.py)
    with ``n`` examples scaled by its multiplier, and a fifth of that in Triton's interpreter."""
    parent = settings.get_profile(profile_name())
    count = n * parent.max_examples // 100
    if backend == "triton":
        count = max(2, count // 5)
    return settings(parent=parent, max_examples=max(1, count))


# ---- the data ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Grad:
    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: str = "contiguous"
    magnitude: str = "normal"
    seed: int = 0
    specials: tuple[tuple[int, str], ...] = ()  # (flat position modulo numel, what)
    offset: int = 1  # elements of storage before the first one, layout "offset"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Case:
    grads: tuple[Grad, ...]
    sharing: tuple[str, int] | None = None  # (kind, index of the first of the pair)
    none_grads: tuple[int, ...] = ()  # parameters (by position) left without a gradient
    norm_type: float = 2.0
    max_norm: tuple[str, float] = ("ratio", 0.5)  # ("ratio", f): f * the exact norm; ("abs", x)
    error_if_nonfinite: bool = False
    foreach: bool | None = None
    mode: str = "hard"
    return_stats: bool | str = False
    form: str = "list"  # how the parameters are passed: list, generator, tensor (one)
    extra: float = 0.0  # the function's own argument: clip_value, total norm, scale, factor


def _values(g: Grad) -> torch.Tensor:
    """``g``'s numel values in fp64: its magnitude class, then its specials."""
    dt = g.dtype
    fi = torch.finfo(dt)
    gen = torch.Generator().manual_seed(g.seed)
    n = g.numel
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    if g.magnitude == "huge":
        v = (v * (fi.max / 8)).clamp(-fi.max, fi.max)
    elif g.magnitude == "tiny":
        v = v * (fi.tiny * 4)
    elif g.magnitude == "subnormal":
        v = v * (fi.tiny * fi.eps * 16)
    elif g.magnitude == "wide":
        # Magnitudes spread (log-uniformly) over most of the dtype's range.
        lo, hi = math.log2(fi.tiny) + 2, math.log2(fi.max) - 4
        e = torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo
        v = torch.sign(v) * torch.exp2(e)
    elif g.magnitude == "zero":
        v = torch.zeros(n, dtype=torch.float64)
    special = {
        "inf": math.inf, "-inf": -math.inf, "nan": math.nan, "max": fi.max, "-max": -fi.max,
        "tiny": fi.tiny, "subnormal": fi.tiny * fi.eps, "0": 0.0, "-0": -0.0,
    }
    if n:
        for pos, what in g.specials:
            v[pos % n] = special[what]
    return v


def make_grad(g: Grad, device: str = "cpu") -> torch.Tensor:
    """The gradient ``g`` describes, in its layout, on ``device``."""
    v = _values(g).to(g.dtype)
    shape = g.shape
    if g.layout == "transposed" and len(shape) >= 2:
        return v.reshape(tuple(reversed(shape))).to(device).permute(
            *reversed(range(len(shape))))
    if g.layout == "strided" and len(shape) >= 1:
        wide = torch.zeros((*shape[:-1], shape[-1] * 2 + 1), dtype=g.dtype)
        wide[..., ::2][..., : shape[-1]] = v.reshape(shape)
        return wide.to(device)[..., ::2][..., : shape[-1]]
    if g.layout == "offset":
        buf = torch.zeros(g.numel + g.offset, dtype=g.dtype)
        buf[g.offset:] = v
        return buf.to(device)[g.offset:].view(shape)
    return v.reshape(shape).to(device).clone()


def make_grads(case: Case, device: str = "cpu") -> list[torch.Tensor]:
    """Every gradient of ``case`` (the sharing applied): a list in the order of ``case.grads``."""
    out = [make_grad(g, device) for g in case.grads]
    if case.sharing is None or len(out) < 2 and case.sharing[0] != "expand":
        return out
    kind, i = case.sharing
    i = i % len(out)
    j = (i + 1) % len(out)
    a = out[i]
    n = max(a.numel(), 2)
    if kind == "same":
        out[j] = a
    elif kind in ("overlap", "interleave"):
        buf = _values(dataclasses.replace(case.grads[i], shape=(2 * n,))).to(a.dtype).to(device)
        if kind == "overlap":
            out[i], out[j] = buf[: n + 1], buf[n:]
        else:
            out[i], out[j] = buf[::2], buf[1::2]
    elif kind == "reinterpret":
        # The same bytes as another dtype of another size (fp32 read as bf16 or the reverse).
        buf = _values(dataclasses.replace(case.grads[i], shape=(2 * n,), magnitude="normal"))
        wide = buf.to(torch.float32).to(device)
        out[i] = wide[:n]
        out[j] = wide.view(torch.bfloat16)[n:]  # bf16 elements n.. are fp32 elements n/2..
    elif kind == "expand":
        row = out[i].reshape(-1)[:1] if out[i].numel() else torch.zeros(1, dtype=a.dtype,
                                                                         device=device)
        out[i] = row.expand(3)
    return out


def shares_memory(tensors: list[torch.Tensor]) -> bool:
    """Whether two of ``tensors`` share a byte, or one stores a byte twice: every element's bytes
    listed from its address, sizes and strides, independently of the package's own check."""
    spans = []
    for t in tensors:
        if t.numel() == 0:
            continue
        idx = torch.zeros((), dtype=torch.int64)
        for size, stride in zip(t.shape, t.stride()):
            idx = idx.unsqueeze(-1) + torch.arange(size) * stride
        first = idx.reshape(-1, 1) * t.element_size() + t.data_ptr()
        spans.append((first + torch.arange(t.element_size())).reshape(-1))
    if not spans:
        return False
    every = torch.cat(spans)
    return every.unique().numel() != every.numel()


# ---- strategies ----------------------------------------------------------------------------------

BOUNDARY_SIZES = (CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3)


@st.composite
def numels(draw, small: bool = False) -> int:
    """0 or 1 element, a few, a few thousand, or (one in twenty, not ``small``) across the chunk
    boundaries."""
    kind = draw(st.integers(0, 19))
    if kind in (0, 10):
        return draw(st.sampled_from([0, 1]))
    if kind == 19 and not small:
        return draw(st.sampled_from(BOUNDARY_SIZES))
    if kind >= 13:
        return draw(st.integers(41, 3000))
    return draw(st.integers(2, 40))


@st.composite
def shapes(draw, small: bool = False, min_dims: int = 0) -> tuple[int, ...]:
    n = draw(numels(small))
    ndim = draw(st.integers(max(min_dims, 0 if n == 1 else 1), 3))
    if ndim == 0:
        return ()
    if ndim == 1 or n == 0:
        dims = [n] + [draw(st.integers(0 if n == 0 else 1, 3)) for _ in range(ndim - 1)]
        return tuple(dims)
    # n split into factors: (rows, n // rows), the rest kept (the numel need not be exactly n).
    rows = draw(st.sampled_from([d for d in (1, 2, 3, 5, 7, 16) if d <= n] or [1]))
    if ndim == 2:
        return (rows, max(n // rows, 1))
    return (rows, 1 if n // rows < 2 else 2, max(n // rows // 2, 1))


@st.composite
def grad_specs(draw, small: bool = False, dtypes=DTYPES, min_dims: int = 0,
               magnitudes=MAGNITUDES, specials=SPECIALS) -> Grad:
    shape = draw(shapes(small, min_dims))
    numel = math.prod(shape)
    special_list = ()
    if numel and specials and draw(st.integers(0, 2)) == 0:  # a third of them have specials
        special_list = tuple(draw(st.lists(
            st.tuples(st.integers(0, numel - 1), st.sampled_from(specials)), min_size=1,
            max_size=3)))
    return Grad(
        dtype=draw(st.sampled_from(dtypes)),
        shape=shape,
        layout=draw(st.sampled_from(LAYOUTS)) if numel < 10 * CHUNK else "contiguous",
        # Half of them normal values (torch's own norm of those is accurate: compared too).
        magnitude=draw(st.one_of(st.just(magnitudes[0]), st.sampled_from(magnitudes))),
        seed=draw(st.integers(0, 2**16)),
        specials=special_list,
        offset=draw(st.integers(1, 3)),
    )


def _cap_total(grads: list[Grad], cap: int) -> list[Grad]:
    """At most ``cap`` elements in all (the chunk-crossing tensors are big): the largest shrunk."""
    out, total = [], 0
    for g in grads:
        if total + g.numel > cap:
            g = dataclasses.replace(g, shape=(g.numel % 97,))
        total += g.numel
        out.append(g)
    return out


def tail_grads(count: int, seed: int, dtypes=DTYPES, min_dims: int = 0) -> list[Grad]:
    """``count`` small gradients made from one seed (drawing each would make a list of 300 cost
    more than the calls it tests): 0 to 300 elements, every dtype and layout, mostly normal
    values, no specials."""
    rng = random.Random(seed)
    out = []
    for k in range(count):
        n = rng.choice([0, 1, rng.randint(2, 40), rng.randint(2, 300)])
        rows = rng.choice([1, 2, 3])
        shape = (n,) if min_dims < 2 and rng.random() < 0.5 else (rows, max(n // rows, 1))
        out.append(Grad(dtype=rng.choice(dtypes), shape=shape, layout=rng.choice(LAYOUTS),
                        magnitude=rng.choice(("normal",) * 5 + MAGNITUDES),
                        seed=seed + k, offset=rng.randint(1, 3)))
    return out


@st.composite
def grad_lists(draw, small: bool = False, dtypes=DTYPES, min_dims: int = 0,
               magnitudes=MAGNITUDES, specials=SPECIALS, max_count: int | None = None
               ) -> tuple[Grad, ...]:
    """0 to 300 gradients (12 when ``small``); mostly a few, so that the CI profile stays fast:
    the first six drawn one by one, the rest made from a seed (``tail_grads``)."""
    top = max_count if max_count is not None else (12 if small else 300)
    count = draw(st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, min(top, 8)),
                           st.integers(0, min(top, 8)), st.integers(0, top)))
    one = grad_specs(small, dtypes, min_dims, magnitudes, specials)
    grads = [draw(one) for _ in range(min(count, 6))]
    if count > len(grads):
        grads += tail_grads(count - len(grads), draw(st.integers(0, 2**16)), dtypes, min_dims)
    return tuple(_cap_total(grads, 2 * CHUNK + 3 if not small else 4000))


def max_norms() -> st.SearchStrategy[tuple[str, float]]:
    return st.one_of(
        st.tuples(st.just("ratio"), st.sampled_from([0.5, 0.999999, 1.0, 1.000001, 2.0, 1e-3])),
        st.tuples(st.just("abs"), st.sampled_from(
            [0.0, 1e-30, 5e-324, 1e-6, 1.0, 1e30, 1e300, math.inf, -1.0, math.nan])),
        st.tuples(st.just("abs"), st.floats(1e-8, 1e8)),
    )


def sharings(count: int) -> st.SearchStrategy:
    if count == 0:
        return st.none()
    return st.one_of(st.none(), st.none(), st.none(), st.none(),
                     st.tuples(st.sampled_from(SHARINGS), st.integers(0, count - 1)))


@st.composite
def cases(draw, small: bool = False, norm_types=PASS_NORM_TYPES + GENERAL_NORM_TYPES,
          dtypes=DTYPES, min_dims: int = 0, magnitudes=MAGNITUDES, specials=SPECIALS,
          max_count: int | None = None, sharing: bool = True, extra=None) -> Case:
    grads = draw(grad_lists(small, dtypes, min_dims, magnitudes, specials, max_count))
    n = len(grads)
    none = tuple(sorted(draw(st.sets(st.integers(0, n - 1), max_size=2)))) if n else ()
    return Case(
        grads=grads,
        sharing=draw(sharings(n)) if sharing else None,
        none_grads=none,
        norm_type=draw(st.sampled_from(norm_types)),
        max_norm=draw(max_norms()),
        error_if_nonfinite=draw(st.booleans()),
        foreach=draw(st.sampled_from([None, True, False])),
        mode=draw(st.sampled_from(["hard", "hard", "soft"])),
        return_stats=draw(st.sampled_from([False, False, True, "per_tensor"])),
        form=draw(st.sampled_from(["list", "list", "generator", "tensor"])),
        extra=draw(extra) if extra is not None else 0.0,
    )
