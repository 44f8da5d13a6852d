"""Named parameter sets for the benchmark: the gradient shapes of a model, without the model.

A set is a frozen ``ParamSet``: a name, a builder (``kind``) and the builder's keyword arguments.
``ParamSet.shapes()`` runs the builder, so a set costs nothing until it is benchmarked.

Built-in sets come in two sizes. ``DEFAULT_SETS`` are GPU-sized (``llama-1b`` is ~1B parameters);
``CPU_SETS`` are scaled down to run on a CPU in a couple of minutes. ``load_sets``
reads more sets (or overrides these) from a TOML file such as ``bench/sets.toml``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

Shape = tuple[int, ...]

# Which default run includes a set: ``--sets`` not given selects the sets whose ``default_on`` is
# the run's device type or "any".
DEFAULT_ON = ("cuda", "cpu", "any")


def llama_like(
    hidden: int = 2048,
    layers: int = 16,
    vocab: int = 32000,
    intermediate: int = 5632,
    heads: int = 32,
    kv_heads: int | None = None,
) -> list[Shape]:
    """A Llama-style decoder: untied embedding and LM head, SwiGLU MLP, 1-D RMSNorm weights.

    ``kv_heads`` below ``heads`` gives grouped-query attention (smaller k/v projections).
    """
    kv_heads = heads if kv_heads is None else kv_heads
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    kv_dim = hidden // heads * kv_heads
    layer = [
        (hidden,),  # input RMSNorm
        (hidden, hidden),  # q
        (kv_dim, hidden),  # k
        (kv_dim, hidden),  # v
        (hidden, hidden),  # o
        (hidden,),  # post-attention RMSNorm
        (intermediate, hidden),  # gate
        (intermediate, hidden),  # up
        (hidden, intermediate),  # down
    ]
    return [(vocab, hidden), *layer * layers, (hidden,), (vocab, hidden)]


def gpt2_like(
    hidden: int = 768,
    layers: int = 12,
    vocab: int = 50257,
    positions: int = 1024,
    intermediate: int | None = None,
) -> list[Shape]:
    """A GPT-2-style decoder: biases and LayerNorms everywhere, LM head tied to ``wte``."""
    intermediate = 4 * hidden if intermediate is None else intermediate
    layer = [
        (hidden,),  # ln_1 weight
        (hidden,),  # ln_1 bias
        (hidden, 3 * hidden),  # c_attn weight (Conv1D layout)
        (3 * hidden,),  # c_attn bias
        (hidden, hidden),  # attn c_proj weight
        (hidden,),  # attn c_proj bias
        (hidden,),  # ln_2 weight
        (hidden,),  # ln_2 bias
        (hidden, intermediate),  # c_fc weight
        (intermediate,),  # c_fc bias
        (intermediate, hidden),  # mlp c_proj weight
        (hidden,),  # mlp c_proj bias
    ]
    return [(vocab, hidden), (positions, hidden), *layer * layers, (hidden,), (hidden,)]


def many_small(
    n: int = 5000, min_numel: int = 1, max_numel: int = 16384, seed: int = 0
) -> list[Shape]:
    """``n`` 1-D tensors with sizes drawn log-uniformly from ``[min_numel, max_numel]``.

    Log-uniform so that tiny tensors (biases, norms, scalars) are as common as mid-sized ones; this
    set measures per-tensor overhead rather than bandwidth. Same ``seed``, same shapes.
    """
    if not 1 <= min_numel <= max_numel:
        raise ValueError(f"need 1 <= min_numel <= max_numel, got {min_numel}, {max_numel}")
    rng = random.Random(seed)
    lo, hi = math.log(min_numel), math.log(max_numel + 1)
    return [(min(max_numel, int(math.exp(rng.uniform(lo, hi)))),) for _ in range(n)]


def one_huge(numel: int = 1 << 29) -> list[Shape]:
    """A single 1-D tensor of ``numel`` elements: pure bandwidth, no per-tensor overhead."""
    return [(numel,)]


def explicit_shapes(shapes: list[list[int]]) -> list[Shape]:
    """Shapes given literally, e.g. ``[[4096, 4096], [4096]]``."""
    return [tuple(int(d) for d in shape) for shape in shapes]


BUILDERS: dict[str, Callable[..., list[Shape]]] = {
    "llama_like": llama_like,
    "gpt2_like": gpt2_like,
    "many_small": many_small,
    "one_huge": one_huge,
    "shapes": explicit_shapes,
}


def _frozen(value: Any) -> Any:
    """Lists (from TOML) as tuples, so that a ``ParamSet`` stays hashable."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class ParamSet:
    """A named set of gradient shapes: ``BUILDERS[kind](**options)``."""

    name: str
    kind: str
    options: tuple[tuple[str, Any], ...] = ()
    default_on: str = "any"
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in BUILDERS:
            known = ", ".join(sorted(BUILDERS))
            raise ValueError(f"set {self.name!r}: unknown kind {self.kind!r} (known: {known})")
        if self.default_on not in DEFAULT_ON:
            raise ValueError(
                f"set {self.name!r}: default_on must be one of {DEFAULT_ON}, "
                f"got {self.default_on!r}"
            )

    @classmethod
    def of(
        cls, name: str, kind: str, *, default_on: str = "any", description: str = "", **options: Any
    ) -> ParamSet:
        """A set from keyword options: ``ParamSet.of("x", "one_huge", numel=1 << 20)``."""
        frozen = tuple(sorted((k, _frozen(v)) for k, v in options.items()))
        return cls(name, kind, frozen, default_on, description)

    def shapes(self) -> list[Shape]:
        """The gradient shapes, in model order."""
        return BUILDERS[self.kind](**dict(self.options))

    def numel(self) -> int:
        """Total number of gradient elements."""
        return sum(math.prod(shape) for shape in self.shapes())

    def num_tensors(self) -> int:
        return len(self.shapes())

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of all gradients in ``dtype``."""
        return self.numel() * dtype.itemsize

    def summary(self) -> str:
        """E.g. ``'953.7M elements in 147 tensors'``."""
        return f"{_human(self.numel())} elements in {self.num_tensors()} tensors"


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    raise AssertionError("unreachable")


def _registry(*sets: ParamSet) -> dict[str, ParamSet]:
    return {s.name: s for s in sets}


DEFAULT_SETS: dict[str, ParamSet] = _registry(
    ParamSet.of("llama-1b", "llama_like", default_on="cuda", description="Llama-style, ~1B params"),
    ParamSet.of("gpt2-small", "gpt2_like", default_on="cuda", description="GPT-2 small, 124M"),
    ParamSet.of("small-5000", "many_small", default_on="cuda", n=5000, description="5000 tiny"),
    ParamSet.of("huge", "one_huge", default_on="cuda", numel=1 << 29, description="one 512M"),
)

CPU_SETS: dict[str, ParamSet] = _registry(
    ParamSet.of(
        "llama-tiny",
        "llama_like",
        default_on="cpu",
        description="Llama-style, ~5M params",
        hidden=256,
        layers=4,
        vocab=4096,
        intermediate=688,
        heads=4,
    ),
    ParamSet.of(
        "gpt2-tiny",
        "gpt2_like",
        default_on="cpu",
        description="GPT-2-style, ~2M params",
        hidden=128,
        layers=4,
        vocab=8192,
        positions=256,
    ),
    ParamSet.of("small-500", "many_small", default_on="cpu", n=500, description="500 tiny"),
    ParamSet.of("huge-small", "one_huge", default_on="cpu", numel=1 << 22, description="one 4M"),
    ParamSet.of("huge-64m", "one_huge", default_on="cpu", numel=1 << 26,
                description="one 64M (a CPU-offloaded shard)"),
)

BUILTIN_SETS: dict[str, ParamSet] = {**DEFAULT_SETS, **CPU_SETS}


def sets_for_device(registry: Mapping[str, ParamSet], device_type: str) -> list[ParamSet]:
    """The sets a run on ``device_type`` uses when none are named."""
    return [s for s in registry.values() if s.default_on in (device_type, "any")]


def parse_sets(tables: Mapping[str, Any], source: str = "<toml>") -> dict[str, ParamSet]:
    """Sets from parsed TOML: each top-level table is one set, ``kind`` names its builder.

    ``default_on`` and ``description`` are optional; every other key is a builder argument.
    """
    sets = {}
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise ValueError(f"{source}: {name!r} must be a table ([{name}]), got {table!r}")
        options = dict(table)
        kind = options.pop("kind", None)
        if kind is None:
            raise ValueError(f"{source}: set {name!r} has no 'kind' (one of {sorted(BUILDERS)})")
        param_set = ParamSet.of(name, kind, **options)
        try:
            param_set.shapes()
        except TypeError as exc:  # a misspelt or missing builder argument
            raise ValueError(f"{source}: set {name!r} ({kind}): {exc}") from None
        sets[name] = param_set
    return sets


def load_sets(path: str | Path) -> dict[str, ParamSet]:
    """Sets from a TOML file, keyed by name (see ``bench/sets.toml`` for the format)."""
    path = Path(path)
    with path.open("rb") as f:
        return parse_sets(tomllib.load(f), source=str(path))
