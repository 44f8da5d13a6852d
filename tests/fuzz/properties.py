"""The fuzzer's properties: one ``check_*`` per public function, run on a ``Case``
(tests/fuzz/strategies.py) with one backend, and held to the fp64 oracle (tests/oracle.py and the
general norms below, which import nothing of fusedclip) and to torch.

Each raises ``AssertionError`` when the call breaks a contract (../shared/DESIGN.md "Contracts",
docs/errors.md, docs/differences.md):

* the returned norm within 1e-5 (relative) of the fp64 norm, of dtype promote(gradients, fp32);
* every gradient within one rounding of its dtype of the oracle's scaled value (NaN where it is);
* an error exactly where torch raises one, or where docs/differences.md says fusedclip differs
  (a shared element refused; torch's overflowed norm; the max norm of an empty tensor);
* after any error, every gradient bit for bit as before (the AMP path with
  ``error_if_nonfinite=True`` unscales first, as torch's recipe does).

``fusedclip`` is looked up as a module attribute at call time, so ``test_mutants.py`` can break a
backend and show that these checks notice.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from hypothesis import event, reject
from oracle import (
    assert_bitwise_equal,
    clip_rtol,
    oracle_adaptive_clipped,
    oracle_coef,
    oracle_norm,
    oracle_norm_dtype,
    oracle_scaled,
    ulp_close,
)
from strategies import Case, make_grads, shares_memory

import fusedclip
from fusedclip.backends import triton as triton_backend

SHARED = r"share memory|has elements that share memory|appears twice"
NONFINITE = r"The total norm of order .* is non-finite"
NO_IDENTITY = r"cannot compute the .* norm on an empty tensor"


# ---- the oracle for torch's general norms (0, negative p, -inf) ----------------------------------

def _negative_p(values: list[float], p: float) -> float:
    """``(sum |x|^p)^(1/p)`` for p < 0 on Python floats, divided by the smallest magnitude first
    (no power overflows) and finished in log space where the root underflows."""
    if any(math.isnan(v) for v in values):
        return math.nan
    low = min(values)
    if low == 0 or math.isinf(low):
        return low
    ratios = torch.tensor(values, dtype=torch.float64) / low
    s = math.fsum(ratios.pow(p).tolist())  # >= 1: the smallest contributes 1
    root = s ** (1.0 / p)
    norm = low * root
    if norm == 0 or norm < 2.2250738585072014e-308:
        norm = math.exp(math.log(low) + math.log(s) / p)
    return norm


def general_oracle(tensors: list[torch.Tensor], p: float) -> float:
    """torch's definition of the norms the passes do not take (the norm of the per-tensor norms),
    computed on Python floats: p = 0 counts, per tensor, the elements other than 0 (NaN counts),
    then the tensors whose count is not 0; -inf takes the smallest magnitude; p < 0 the
    negative-p norm (one zero makes it 0; an infinite element adds nothing)."""
    per = []
    for t in tensors:
        values = t.detach().double().abs().reshape(-1).tolist()
        if p == 0:
            per.append(float(sum(1 for v in values if v != 0)))
        elif math.isinf(p):
            per.append(math.nan if any(map(math.isnan, values)) else min(values))
        else:
            per.append(_negative_p(values, p))
    if p == 0:
        return float(sum(1 for n in per if n != 0))
    if math.isinf(p):
        return math.nan if any(map(math.isnan, per)) else min(per)
    return _negative_p(per, p)


def exact_norm(tensors: list[torch.Tensor], p: float) -> float:
    if not tensors:
        return 0.0
    return oracle_norm(tensors, p) if p > 0 else general_oracle(tensors, p)


# ---- assertions ----------------------------------------------------------------------------------

def subnormal_min(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def assert_norm(got: torch.Tensor | float, exact: float, dtype: torch.dtype, what="norm",
                subnormals: float = 1.0) -> None:
    """A norm returned in ``dtype`` against the fp64 one: 1e-5 relative (plus ``subnormals`` times
    the dtype's smallest subnormal, where rounding to it is coarser); inf only where the fp64 norm
    is, or is within 1e-5 of past the dtype's largest value."""
    got = float(got)
    if math.isnan(exact) or math.isinf(exact):
        assert got == exact or math.isnan(got) and math.isnan(exact), \
            f"{what}: got {got}, expected {exact}"
        return
    fi = torch.finfo(dtype)
    if math.isinf(got):
        assert exact >= fi.max * (1 - 2e-5), f"{what}: got {got}, expected {exact} ({dtype})"
        return
    assert abs(got - exact) <= 1e-5 * abs(exact) + subnormals * subnormal_min(dtype), \
        f"{what}: got {got!r}, expected {exact!r} (relative error " \
        f"{abs(got - exact) / exact if exact else math.inf:.3g})"


def returned_nonfinite(exact: float, dtype: torch.dtype) -> bool | None:
    """Whether the norm a call returns in ``dtype`` is inf or NaN, given the fp64 one (None: too
    close to the dtype's largest value to say, so either is right)."""
    if not math.isfinite(exact):
        return True
    top = torch.finfo(dtype).max
    if abs(exact - top) <= 2e-5 * top or abs(exact - top * (1 + 2.0 ** -24)) <= 2e-5 * top:
        return None
    return not math.isfinite(float(torch.tensor(exact, dtype=torch.float64).to(dtype)))


def call(fn, *args, **kwargs):
    """(result, None) or (None, exception) of ``fn(*args, **kwargs)``."""
    try:
        return fn(*args, **kwargs), None
    except (ValueError, TypeError, RuntimeError) as exc:
        return None, exc


def note(what: str) -> None:
    """Counts what an example exercised (``pytest --hypothesis-show-statistics``); nothing
    outside a hypothesis test (test_regressions.py)."""
    try:
        event(what)
    except Exception:  # noqa: BLE001 (InvalidArgument outside a test)
        pass


def expect_error(exc, cls, pattern) -> None:
    note(f"raises {cls.__name__}")
    assert exc is not None, f"expected {cls.__name__} matching {pattern!r}, nothing was raised"
    assert isinstance(exc, cls) and re.search(pattern, str(exc)), \
        f"expected {cls.__name__} matching {pattern!r}, got {type(exc).__name__}: {exc}"


def no_error(exc) -> None:
    note("no error")
    assert exc is None, f"unexpected {type(exc).__name__}: {exc}"


# ---- building a call -----------------------------------------------------------------------------

def interpreter_limits(backend: str, case: Case, tensors: list[torch.Tensor]) -> None:
    """Rejects (hypothesis: draw another) what Triton's CPU interpreter cannot run as the GPU
    does: bf16 subnormals, which Triton 3.8's interpreter converts to fp32 wrongly (its
    ``_convert_float``: 2^-130 reads as 0, -3 * 2^-133 as -2^-127), so the kernels see other
    values there. test_regressions.py holds it as a strict xfail. Refused sharing never reaches a
    kernel, so it is kept."""
    if backend != "triton" or not triton_backend.interpreting():
        return
    if case.sharing is not None and shares_memory(tensors):
        return
    tiny = torch.finfo(torch.bfloat16).tiny
    for t in tensors:
        if t.dtype == torch.bfloat16:
            a = t.detach().float().abs()
            if bool(((a > 0) & (a < tiny)).any()):
                reject()


def build(case: Case, device: str):
    """(parameters, their gradients, copies of the gradients as they were)."""
    grads = make_grads(case, device)
    params = []
    for k, g in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype, device=device))
        if k not in case.none_grads:
            p.grad = g
        params.append(p)
    present = [p.grad for p in params if p.grad is not None]
    return params, present, [g.clone() for g in present]


def passed(case: Case, params: list[torch.Tensor]):
    """The parameters in the form the case passes them: a list, a generator, or one tensor."""
    if case.form == "generator":
        return (p for p in params)
    if case.form == "tensor" and len(params) == 1:
        return params[0]
    return params


def twins(before: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters whose gradients are independent copies of ``before`` (the gradients as they
    were before the call), for torch to run on."""
    out = []
    for g in before:
        q = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype, device=g.device))
        q.grad = g.clone()
        out.append(q)
    return out


def limit_of(case: Case, exact: float) -> float:
    kind, x = case.max_norm
    if kind == "ratio":
        return x * exact if math.isfinite(exact) and exact > 0 else 1.0
    return x


def refused(exc, message: str, grads: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    """The call raised ValueError(message) and left every gradient bit-identical."""
    expect_error(exc, ValueError, message)
    assert_bitwise_equal(grads, before, nan_payloads=True)


def refused_sharing(case: Case, grads: list[torch.Tensor]) -> bool:
    return case.sharing is not None and shares_memory(grads)


def benign(tensors: list[torch.Tensor], p: float) -> bool:
    """Whether torch's own norm of these is expected accurate: every nonzero finite magnitude in
    [2^-20, 2^20] and a moderate p (torch sums |x|^p in the gradients' precision, unscaled)."""
    if not (p in (1.0, 2.0, 3.0, 1.5, 0.5, math.inf) or p <= 0):
        return False
    if p < 0 and any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        return False  # torch's -1 norm of 65535 fp16 values: 1.2% off
    for t in tensors:
        a = t.detach().double().abs()
        a = a[torch.isfinite(a) & (a > 0)]
        if a.numel() and (float(a.min()) < 2.0**-20 or float(a.max()) > 2.0**20):
            return False
    return True


def assert_close_to_torch(ours: list[torch.Tensor], theirs: list[torch.Tensor],
                          torch_norm: torch.Tensor, exact: float, limit: float | None = None
                          ) -> None:
    """Gradients against torch's, where torch's norm is finite: torch's coefficient carries its
    norm's error and a rounding to the norm's dtype (coarser where it is subnormal there: 2e-6 in
    fp16), its product another rounding; allow that much (twice over), as
    tests/api/test_parity.py does."""
    torch_err = abs(float(torch_norm) - exact) / exact if exact else 0.0
    rounding = torch.finfo(torch_norm.dtype).eps
    if limit is not None and math.isfinite(limit) and limit > 0:
        coef = min(1.0, limit / (float(torch_norm) + 1e-6))
        rounded = float(torch.tensor(coef, dtype=torch.float64).to(torch_norm.dtype))
        if coef > 0:
            rounding = max(rounding, abs(rounded - coef) / coef)
    for g, t in zip(ours, theirs):
        fi = torch.finfo(g.dtype)
        rtol = clip_rtol(g.dtype) + 2 * (torch_err + rounding + 2 * fi.eps)
        torch.testing.assert_close(g, t, rtol=rtol, atol=fi.tiny, equal_nan=True)


# ---- clip_grad_norm_ and get_total_norm ----------------------------------------------------------

def check_clip_grad_norm(backend: str, device: str, case: Case) -> None:
    params, grads, before = build(case, device)
    interpreter_limits(backend, case, grads)
    p = case.norm_type
    soft = case.mode == "soft"
    shared = refused_sharing(case, grads)
    empty_negative = p < 0 and any(g.numel() == 0 for g in before)
    exact = math.nan if shared or empty_negative else exact_norm(before, p)
    limit = limit_of(case, exact)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, exc = call(fusedclip.clip_grad_norm_, passed(case, params), limit, p,
                           case.error_if_nonfinite, case.foreach, backend=backend,
                           mode=case.mode, return_stats=case.return_stats)
    if case.form == "generator" and not params:  # torch's warning
        assert any("empty generator" in str(w.message) for w in caught), "no warning"
    if math.isnan(limit) or limit < 0:
        return refused(exc, "max_norm must be a non-negative number", grads, before)
    if shared:
        return refused(exc, SHARED, grads, before)
    if empty_negative:
        expect_error(exc, RuntimeError, NO_IDENTITY)
        assert_bitwise_equal(grads, before, nan_payloads=True)
        _torch_agrees_on_error(before, case, limit, exc)
        return
    result_dtype = oracle_norm_dtype(before)
    raises = case.error_if_nonfinite and returned_nonfinite(exact, result_dtype)
    if raises:
        expect_error(exc, RuntimeError, NONFINITE)
        assert_bitwise_equal(grads, before, nan_payloads=True)
        _torch_agrees_on_error(before, case, limit, exc)
        return
    if raises is None and exc is not None:  # at the top of the dtype's range: either is right
        expect_error(exc, RuntimeError, NONFINITE)
        assert_bitwise_equal(grads, before, nan_payloads=True)
        return
    no_error(exc)
    stats = result if case.return_stats else None
    norm = stats.total_norm if stats is not None else result
    if not before:
        assert norm.device.type == "cpu" and norm.dtype == torch.float32 and float(norm) == 0
        return
    assert norm.shape == () and norm.device == before[0].device
    assert norm.dtype == result_dtype, f"norm dtype {norm.dtype}, expected {result_dtype}"
    assert_norm(norm, exact, result_dtype)
    coef = oracle_coef(limit, exact, soft)
    if stats is not None:
        assert stats.clip_coef.dtype == torch.float64
        got = float(stats.clip_coef)
        assert got == coef or math.isnan(got) and math.isnan(coef) or \
            abs(got - coef) <= 1e-5 * abs(coef), f"clip_coef {got}, expected {coef}"
        if case.return_stats == "per_tensor":
            per = stats.per_tensor_norms.tolist()
            assert len(per) == len(before)
            for k, (n, g0) in enumerate(zip(per, before)):
                assert_norm(n, exact_norm([g0], p), torch.float64, f"per-tensor norm {k}")
    for k, (g, g0) in enumerate(zip(grads, before)):
        try:
            ulp_close(g, oracle_scaled(g0, coef))
        except AssertionError as e:
            raise AssertionError(f"gradient {k} ({g0.dtype}, {tuple(g0.shape)}): {e}") from None
    if not soft:
        _against_torch_clip(before, grads, case, limit, exact, norm)


def _torch_agrees_on_error(before, case, limit, exc) -> None:
    """fusedclip raised a RuntimeError: torch must raise one too, with the same words, unless
    docs/differences.md says torch's norm stays finite there (it never does for these)."""
    if case.mode == "soft":
        return
    theirs = twins(before)
    _, texc = call(torch.nn.utils.clip_grad_norm_, theirs, limit, case.norm_type,
                   case.error_if_nonfinite)
    assert texc is not None, f"fusedclip raised ({exc}) where torch does not"
    if torch_empty_max(texc, case.norm_type, before):
        return
    if re.search(NO_IDENTITY, str(exc)):
        # torch's words, but for the number: torch writes p = -1.0 as "-1", fusedclip (and
        # docs/errors.md) as "-1.0".
        assert isinstance(texc, RuntimeError) and re.search(NO_IDENTITY, str(texc)), texc
        return
    assert str(texc) == str(exc), f"torch says {texc!r}, fusedclip {exc!r}"


def torch_empty_max(texc: BaseException, p: float, before: list[torch.Tensor]) -> bool:
    """torch's error for the max norm of a list with an empty tensor, which fusedclip takes
    (docs/differences.md): torch raises it before any other (``error_if_nonfinite``'s)."""
    return math.isinf(p) and p > 0 and "empty" in str(texc) and \
        any(g.numel() == 0 for g in before)


def _against_torch_clip(before, grads, case, limit, exact, norm) -> None:
    """torch on copies: an error only where docs/differences.md says so; where its norm is
    non-finite, the same bits; where it is finite and expected accurate, close."""
    theirs = twins(before)
    tnorm, texc = call(torch.nn.utils.clip_grad_norm_, theirs, limit, case.norm_type,
                       case.error_if_nonfinite)
    p = case.norm_type
    if texc is not None:
        msg = str(texc)
        empty_max = torch_empty_max(texc, p, before)
        overflowed = case.error_if_nonfinite and "non-finite" in msg and math.isfinite(exact)
        assert empty_max or overflowed, f"torch raised where fusedclip did not: {texc}"
        note("torch raised (documented difference)")
        return
    tgrads = [q.grad for q in theirs if q.grad is not None]
    if not torch.isfinite(tnorm):
        if math.isfinite(exact):
            note("torch's norm overflowed (documented difference)")
            return  # torch's norm overflowed its dtype or its sum (docs/differences.md)
        note("non-finite norm: the same bits as torch")
        assert_bitwise_equal(grads, tgrads)
        return
    assert math.isfinite(exact) or not benign(before, p), \
        f"torch's norm is finite ({float(tnorm)}), the oracle's {exact}"
    if not math.isfinite(exact) or exact == 0:
        return
    if benign(before, p):
        eps = max(torch.finfo(g.dtype).eps for g in before)
        tol = 1e-3 + 8 * eps * (1 if p >= 1 or p <= 0 else 1 / p)
        rel = abs(float(tnorm) - exact) / exact
        assert rel <= tol, f"torch's norm {float(tnorm)} vs the oracle's {exact}: {rel:.3g}"
        assert_close_to_torch(grads, tgrads, tnorm, exact, limit)
        note("close to torch")


def check_get_total_norm(backend: str, device: str, case: Case) -> None:
    _, tensors, before = build(case, device)
    interpreter_limits(backend, case, tensors)
    p = case.norm_type
    shared = refused_sharing(case, tensors)
    empty_negative = p < 0 and any(g.numel() == 0 for g in before)
    arg = tensors[0] if case.form == "tensor" and len(tensors) == 1 else (
        iter(tensors) if case.form == "generator" else tensors)
    result, exc = call(fusedclip.get_total_norm, arg, p, case.error_if_nonfinite, case.foreach,
                       backend=backend)
    assert_bitwise_equal(tensors, before, nan_payloads=True)  # read, never written
    if shared:
        expect_error(exc, ValueError, SHARED)
        return
    if empty_negative:
        expect_error(exc, RuntimeError, NO_IDENTITY)
        return
    exact = exact_norm(before, p)
    result_dtype = oracle_norm_dtype(before)
    raises = case.error_if_nonfinite and returned_nonfinite(exact, result_dtype)
    theirs, texc = call(torch.nn.utils.get_total_norm, [t.clone() for t in before], p,
                        case.error_if_nonfinite)
    if raises or raises is None and exc is not None:
        expect_error(exc, RuntimeError, NONFINITE)
        if raises:
            assert texc is not None, f"fusedclip raised ({exc}) where torch does not"
            if not torch_empty_max(texc, p, before):
                assert str(texc) == str(exc), f"torch says {texc!r}, fusedclip {exc!r}"
        return
    no_error(exc)
    if not before:
        assert result.device.type == "cpu" and float(result) == 0
        return
    assert result.dtype == result_dtype and result.shape == ()
    assert_norm(result, exact, result_dtype)
    if texc is not None:
        assert torch_empty_max(texc, p, before) or \
            (case.error_if_nonfinite and "non-finite" in str(texc)), f"torch raised: {texc}"
        return
    if torch.isfinite(theirs) and math.isfinite(exact) and exact and benign(before, p):
        eps = max(torch.finfo(g.dtype).eps for g in before)
        tol = 1e-3 + 8 * eps * (1 if p >= 1 or p <= 0 else 1 / p)
        assert abs(float(theirs) - exact) <= tol * exact, f"torch {float(theirs)} vs {exact}"
    if not math.isfinite(exact) and benign(before, p):
        assert not torch.isfinite(theirs)


# ---- clip_grads_with_norm_ -----------------------------------------------------------------------

TOTAL_NORM_KINDS = ("float", torch.float32, torch.float64, torch.bfloat16, torch.int64)


def check_clip_grads_with_norm(backend: str, device: str, case: Case, kind=torch.float32
                               ) -> None:
    params, grads, before = build(case, device)
    interpreter_limits(backend, case, grads)
    limit = limit_of(case, 1.0)
    value = case.extra
    if kind == "float":
        total = value
        wide = value
    else:
        total = torch.tensor(value, dtype=torch.float64).to(kind)
        wide = float(total)
    _, exc = call(fusedclip.clip_grads_with_norm_, passed(case, params), limit, total,
                  case.foreach, backend=backend)
    if math.isnan(limit) or limit < 0:
        return refused(exc, "max_norm must be a non-negative number", grads, before)
    if refused_sharing(case, grads):
        return refused(exc, SHARED, grads, before)
    no_error(exc)
    coef = oracle_coef(limit, wide)
    for k, (g, g0) in enumerate(zip(grads, before)):
        try:
            ulp_close(g, oracle_scaled(g0, coef))
        except AssertionError as e:
            raise AssertionError(f"gradient {k} ({g0.dtype}): {e}") from None
    if kind in (torch.float32, torch.float64) and grads and not (
            torch.finfo(kind).max < limit < math.inf):
        # (torch computes its coefficient in total_norm's dtype, where such a max_norm is inf:
        # inf / inf = NaN where fusedclip's fp64 coefficient is 1e300 / inf = 0.)
        theirs = twins(before)
        torch.nn.utils.clip_grads_with_norm_(theirs, limit, total.to(device))
        tgrads = [q.grad for q in theirs if q.grad is not None]
        if not math.isfinite(coef) or coef == 1.0 or coef == 0.0:
            # torch's NaN, 0 and exact-1 coefficients are exact too (a no-op or a sign-kept 0).
            torch.testing.assert_close(grads, tgrads, rtol=0, atol=0, equal_nan=True)
        else:
            for g, t in zip(grads, tgrads):
                fi = torch.finfo(g.dtype)
                rtol = clip_rtol(g.dtype) + 2 * (torch.finfo(kind).eps + 2 * fi.eps)
                torch.testing.assert_close(g, t, rtol=rtol, atol=fi.tiny, equal_nan=True)


# ---- clip_grad_value_ ----------------------------------------------------------------------------

def bound_in(clip_value: float, dtype: torch.dtype) -> torch.Tensor:
    """``clip_value`` as a gradient of ``dtype`` compares with it: torch's own conversion where
    the dtype holds it; past its range, rounded through fp32 (docs/differences.md), where torch's
    conversion raises instead."""
    if math.isinf(clip_value) or dtype == torch.float64:
        return torch.tensor(clip_value, dtype=dtype)
    return torch.tensor(clip_value, dtype=torch.float64).to(torch.float32).to(dtype)


def check_clip_grad_value(backend: str, device: str, case: Case) -> None:
    params, grads, before = build(case, device)
    interpreter_limits(backend, case, grads)
    cv = case.extra
    _, exc = call(fusedclip.clip_grad_value_, passed(case, params), cv, case.foreach,
                  backend=backend)
    if math.isnan(cv) or cv < 0:
        return refused(exc, "clip_value must be a non-negative number", grads, before)
    if refused_sharing(case, grads):
        return refused(exc, SHARED, grads, before)
    no_error(exc)
    expected = []
    for g0 in before:
        b = bound_in(cv, g0.dtype).to(device)
        expected.append(torch.clamp(g0, -b, b) if torch.isfinite(b) else g0.clone())
    assert_bitwise_equal(grads, expected)
    # torch's own function, where it takes the bound (it raises past a dtype's range).
    theirs = twins(before)
    _, texc = call(torch.nn.utils.clip_grad_value_, theirs, cv, case.foreach)
    if texc is None:
        assert_bitwise_equal(grads, [q.grad for q in theirs if q.grad is not None])
    elif not before:
        # torch 2.14's foreach path fails on an empty list ("Expected
        # !nested_tensorlist[0].empty()"); fusedclip does nothing, as with no gradients.
        pass
    else:
        assert "overflow" in str(texc) and any(
            torch.finfo(g.dtype).max < cv < math.inf for g in before), f"torch: {texc}"


# ---- clip_grad_norm_per_tensor_ ------------------------------------------------------------------

def check_per_tensor(backend: str, device: str, case: Case) -> None:
    params, grads, before = build(case, device)
    interpreter_limits(backend, case, grads)
    p = case.norm_type
    soft = case.mode == "soft"
    exact = [exact_norm([g], p) if p > 0 else math.nan for g in before]
    kind, x = case.max_norm
    limits = [x * n if math.isfinite(n) and n > 0 else 1.0 for n in exact] \
        if kind == "ratio" else [x] * max(len(before), 1)  # one threshold: checked without grads
    arg = limits if kind == "ratio" else x
    result, exc = call(fusedclip.clip_grad_norm_per_tensor_, passed(case, params), arg, p,
                       mode=case.mode, backend=backend)
    if not p > 0:
        return refused(exc, "takes norm_type p > 0 or inf", grads, before)
    if any(math.isnan(m) or m < 0 for m in limits):
        return refused(exc, "must be a non-negative number", grads, before)
    if refused_sharing(case, grads):
        return refused(exc, SHARED, grads, before)
    no_error(exc)
    assert result.shape == (len(before),)
    if not before:
        return
    assert result.dtype == oracle_norm_dtype(before)
    for k, (n, e) in enumerate(zip(result.tolist(), exact)):
        assert_norm(n, e, result.dtype, f"norm {k}")
    for k, (g, g0, m, e) in enumerate(zip(grads, before, limits, exact)):
        try:
            ulp_close(g, oracle_scaled(g0, oracle_coef(m, e, soft)))
        except AssertionError as err:
            raise AssertionError(f"gradient {k} ({g0.dtype}): {err}") from None


# ---- adaptive_clip_grad_ -------------------------------------------------------------------------

def check_adaptive(backend: str, device: str, case: Case) -> None:
    params, grads, before = build(case, device)
    interpreter_limits(backend, case, grads)
    gen = torch.Generator().manual_seed(len(params))
    for q in params:  # the parameters' own values (they are only read)
        q.data.copy_(torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.dtype))
    if len(params) >= 2 and case.sharing is not None and params[0].shape == params[1].shape \
            and params[0].dtype == params[1].dtype:
        params[1].data = params[0].data  # tied parameters: only read, so taken
    factor = case.extra
    eps = abs(case.max_norm[1]) if case.max_norm[0] == "abs" else 1e-3
    p = case.norm_type
    _, exc = call(fusedclip.adaptive_clip_grad_, passed(case, params), factor, eps, p,
                  backend=backend)
    if math.isnan(eps):
        return refused(exc, "eps must be a non-negative number", grads, before)
    if not p > 0:
        return refused(exc, "takes norm_type p > 0 or inf", grads, before)
    if refused_sharing(case, grads):
        return refused(exc, SHARED, grads, before)
    no_error(exc)
    with_grad = [q for q in params if q.grad is not None]
    for k, (g, g0, q) in enumerate(zip(grads, before, with_grad)):
        if g0.numel() == 0:
            continue
        want = oracle_adaptive_clipped(g0, q.detach(), factor, eps, p)
        try:
            ulp_close(g, want)
        except AssertionError as err:
            raise AssertionError(f"gradient {k} ({g0.dtype}, {tuple(g0.shape)}): {err}") from None


# ---- the AMP path --------------------------------------------------------------------------------

def _scaler(device: str, scale: float) -> torch.amp.GradScaler:
    scaler = torch.amp.GradScaler(device, init_scale=scale)
    scaler.scale(torch.zeros((), device=device))  # makes its scale tensor
    return scaler


def check_amp(backend: str, device: str, case: Case) -> None:
    """``clip_grad_norm_(..., scaler=, optimizer=)`` against the oracle of the unscaled gradients
    and against torch's recipe (``scaler.unscale_`` then ``clip_grad_norm_``)."""
    params, grads, before = build(case, device)
    interpreter_limits(backend, case, grads)
    p = case.norm_type
    scale = case.extra
    scaler = _scaler(device, scale)
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    if opt is None:
        return
    inv = float(scaler._scale.double().reciprocal().float())
    shared = refused_sharing(case, grads)
    # One empty gradient object owned twice shares no element: the reference (the general AMP
    # path) refuses it as owned twice, the compiled engine's one-call path takes it. Either.
    twice_empty = not shared and len({id(g) for g in grads}) < len(grads)
    wide = [g.detach().double().cpu() * inv for g in before]
    exact = math.nan if shared else exact_norm(wide, p) if p > 0 else math.nan
    limit = limit_of(case, exact)
    result, exc = call(fusedclip.clip_grad_norm_, params, limit, p, case.error_if_nonfinite,
                       backend=backend, scaler=scaler, optimizer=opt)
    if math.isnan(limit) or limit < 0:
        return refused(exc, "max_norm must be a non-negative number", grads, before)
    if not p > 0:
        return refused(exc, "is not available with scaler=", grads, before)
    if any(g.dtype == torch.float16 for g in before):
        return refused(exc, "Attempting to unscale FP16 gradients", grads, before)
    if shared or twice_empty and exc is not None:
        return refused(exc, SHARED, grads, before)
    if not before:
        no_error(exc)
        return
    result_dtype = oracle_norm_dtype(before)
    found = bool(sum(float(f) for f in
                     scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()))
    # As torch's unscale_: the stored (scaled) values are checked, not their products with the
    # inverse scale (a scale below 1 can unscale a finite fp64 value past 1.8e308, unflagged).
    assert found == (not all(bool(torch.isfinite(g).all()) for g in before)), "found_inf"
    overflow = any(bool((~torch.isfinite(w) & torch.isfinite(g.cpu())).any())
                   for w, g in zip(wide, before))
    raises = case.error_if_nonfinite and returned_nonfinite(exact, result_dtype)
    if raises or raises is None and exc is not None:
        expect_error(exc, RuntimeError, NONFINITE)
        # torch's recipe unscaled the gradients before its clip raised: so does fusedclip.
        for g, g0 in zip(grads, before):
            ulp_close(g, oracle_scaled(g0, inv))
        return
    no_error(exc)
    assert result.dtype == result_dtype
    # The norm of the stored values is rounded before it is unscaled: below fp64's normal range
    # that rounding (half a subnormal step) is multiplied by the inverse scale (8 for a scale of
    # 1/8), so a subnormal norm may be that many steps off.
    assert_norm(result, exact, result_dtype, subnormals=max(1.0, inv))
    if overflow:
        # The unscaled value is past fp64's range: the fp64 oracle has no value for its product
        # with the coefficient (fusedclip multiplies once, by inv_scale * 0; torch's recipe
        # unscales to inf, then multiplies by 0: NaN). Not compared.
        note("unscaling overflows fp64: gradients not compared")
        return
    coef = oracle_coef(limit, exact) * inv
    for k, (g, g0) in enumerate(zip(grads, before)):
        try:
            ulp_close(g, oracle_scaled(g0, coef))
        except AssertionError as err:
            raise AssertionError(f"gradient {k} ({g0.dtype}): {err}") from None
    # torch's recipe on copies.
    theirs = twins(before)
    tscaler = _scaler(device, scale)
    topt = torch.optim.SGD(theirs, lr=0.1)
    tscaler.unscale_(topt)
    tnorm, texc = call(torch.nn.utils.clip_grad_norm_, theirs, limit, p, False)
    if texc is None and torch.isfinite(tnorm) and math.isfinite(exact) and exact and \
            benign(wide, p):
        assert_close_to_torch(grads, [q.grad for q in theirs if q.grad is not None], tnorm,
                              exact)
