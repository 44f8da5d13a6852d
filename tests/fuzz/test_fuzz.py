"""The differential fuzzer: every public function, on every backend of the matrix (conftest's
``backend`` x ``device``), on generated gradient lists, held to the fp64 oracle and to torch by the
properties of ``properties.py``. A failure shrinks to a minimal ``Case``; paste it into
``test_regressions.py`` (docs/testing.md "The fuzzer")."""

from __future__ import annotations

import math

import properties
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import DTYPES, PASS_NORM_TYPES, cases, examples


def run(backend, device, n, strategy, check):
    """``check(backend, device, case)`` over ``n`` (scaled by the profile) examples."""

    @examples(backend, n)
    @given(case=strategy)
    def prop(case):
        if isinstance(case, tuple):
            check(backend, device, *case)
        else:
            check(backend, device, case)

    prop()


def test_clip_grad_norm(backend, device):
    run(backend, device, 150, cases(small=backend == "triton"), properties.check_clip_grad_norm)


def test_get_total_norm(backend, device):
    run(backend, device, 50, cases(small=backend == "triton"), properties.check_get_total_norm)


TOTAL_NORMS = st.one_of(
    st.sampled_from([0.0, 1e-30, 1e-6, 0.5, 1.0, 3.7, 1e30, math.inf, math.nan]),
    st.floats(0, 1e6),
)


def test_clip_grads_with_norm(backend, device):
    strategy = st.tuples(cases(small=backend == "triton", extra=TOTAL_NORMS),
                         st.sampled_from(properties.TOTAL_NORM_KINDS))
    run(backend, device, 40, strategy, properties.check_clip_grads_with_norm)


CLIP_VALUES = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-40, 1e-8, 0.5, 1.0, 65504.0, 65519.0, 65520.0, 1e5,
                     3.4e38, 3.4028235e38, 3.5e38, 1e39, math.inf, -0.5, math.nan]),
    st.floats(0, 10),
)


def test_clip_grad_value(backend, device):
    run(backend, device, 50, cases(small=backend == "triton", extra=CLIP_VALUES),
        properties.check_clip_grad_value)


def test_clip_grad_norm_per_tensor(backend, device):
    strategy = cases(small=backend == "triton", norm_types=PASS_NORM_TYPES + (0.0, -1.0))
    run(backend, device, 40, strategy, properties.check_per_tensor)


FACTORS = st.sampled_from([0.0, 1e-3, 0.01, 0.1, 1.0, 1e3])


def test_adaptive_clip_grad(backend, device):
    strategy = cases(small=True, norm_types=PASS_NORM_TYPES + (0.0,), max_count=24,
                     extra=FACTORS)
    run(backend, device, 25, strategy, properties.check_adaptive)


NO_FP16 = (torch.float32, torch.bfloat16, torch.float64)
SCALES = st.sampled_from([1.0, 2.0**16, 2.0**-3, 1000.0, 2.0**24])


def test_amp(backend, device):
    small = backend == "triton"
    strategy = st.sampled_from([NO_FP16, NO_FP16, NO_FP16, DTYPES]).flatmap(
        lambda d: cases(small=small, dtypes=d, norm_types=PASS_NORM_TYPES + (-1.0,),
                        extra=SCALES))
    run(backend, device, 60, strategy, properties.check_amp)
