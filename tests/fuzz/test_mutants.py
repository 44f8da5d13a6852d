"""The fuzzer can fail: each mutant breaks the reference backend (or an argument check) the way a
kernel could go wrong, and the ``clip_grad_norm_`` property must notice within a few dozen
examples. Shrinking is off (it would only cost time): the first failing example is enough."""

from __future__ import annotations

import math

import properties
import pytest
import torch
from hypothesis import Phase, given, settings
from strategies import cases

import fusedclip.api
from fusedclip.backends import reference

ORIGINAL_SCALE = reference.scale_
ORIGINAL_TOTAL_NORM = reference.total_norm


def off_by_ulps(tensors, coef):
    """A coefficient wrong by 2^-20 (8 ulp of fp32): the product drifts past one rounding."""
    ORIGINAL_SCALE(tensors, coef * (1 + 2.0**-20))


def skips_last_element(tensors, coef):
    """Every gradient's last element left unscaled (a tail loop that stops one short)."""
    keep = []
    for t in tensors:
        if t.numel():
            last = tuple(n - 1 for n in t.shape)
            keep.append((t, last, t[last].clone()))
    ORIGINAL_SCALE(tensors, coef)
    for t, last, value in keep:
        t[last] = value


def ignores_nan(tensors, norm_type, *args, **kwargs):
    """NaN read as 0 in the norm (a max or a sum that drops NaN): a finite norm where torch's is
    NaN."""
    return ORIGINAL_TOTAL_NORM([torch.nan_to_num(t, nan=0.0) for t in tensors], norm_type,
                               *args, **kwargs)


def writes_before_error(tensors, norm_type, *args, **kwargs):
    """Pass 1 that writes (zeroes the first gradient) when the norm is not finite: the error of
    error_if_nonfinite=True then comes after a change."""
    norm = ORIGINAL_TOTAL_NORM(tensors, norm_type, *args, **kwargs)
    if not math.isfinite(float(norm)) and tensors and tensors[0].numel():
        tensors[0].zero_()
    return norm


# (module, attribute, its broken replacement, what the property's failure says)
MUTANTS = {
    "off-by-ulps": (reference, "scale_", off_by_ulps, "not close"),
    "skips-last-element": (reference, "scale_", skips_last_element, "not close"),
    "ignores-nan": (reference, "total_norm", ignores_nan, "expected nan|is non-finite"),
    "writes-before-error": (reference, "total_norm", writes_before_error, "differs at"),
    "no-shared-memory-check": (fusedclip.api, "check_writable_grads", lambda grads: None,
                               "expected ValueError"),
}


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@pytest.mark.parametrize("mutant", MUTANTS)
def test_property_catches_mutant(monkeypatch, mutant):
    module, name, broken, says = MUTANTS[mutant]
    monkeypatch.setattr(module, name, broken)

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              phases=(Phase.explicit, Phase.generate), print_blob=False)
    @given(case=cases(specials=("nan", "inf", "max", "-0")))
    def prop(case):
        properties.check_clip_grad_norm("reference", "cpu", case)

    with pytest.raises(AssertionError, match=says):
        prop()
