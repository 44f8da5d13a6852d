"""Backend selection: what runs where, overrides, the deprecated ``"cuda"`` name, what
``available_backends()``, ``select_backend()`` and ``python -m fusedclip backends`` say, and the
contract every backend meets (``fusedclip.backends.Backend``)."""

from __future__ import annotations

import inspect
import math
import typing

import pytest
import torch
from gradients import grads, make_params

import fusedclip
from fusedclip import _select
from fusedclip.backends import Backend, BackendStatus
from fusedclip.backends.cpp import _lib
from fusedclip.tools.cli import main

# What auto picks for dense floating CPU tensors: the C++ engine when it is built.
CPU_AUTO = "cpp" if _lib.loaded() else "reference"


def _cpu_grads():
    return grads(make_params([(3,), (4, 5)]))


def _set_status(monkeypatch, name, available, devices):
    """Backend ``name`` as if it ran ``devices`` here (the status is read once per process)."""
    status = BackendStatus(available, "test", devices)
    monkeypatch.setattr(_select.get(name), "_status", status)
    assert _select.backend_status(name) is status


def _fake_cuda_tensors(*make):
    """CUDA tensors as FakeTensors: a device and dtype without a GPU (all selection reads)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return [m() for m in make]


def test_available_backends_reports_every_backend_with_a_reason():
    status = fusedclip.available_backends()
    assert list(status) == list(_select.BACKEND_NAMES) == ["cpp", "triton", "reference"]
    for name, s in status.items():
        assert isinstance(s, fusedclip.BackendStatus) and isinstance(s.available, bool)
        assert s.reason, f"{name} gives no reason"
        assert repr(s).startswith("available" if s.available else "unavailable")
        assert s == _select.backend_status(name)
        for device in ("cpu", "cuda", "meta"):
            expected = s.available and (s.devices is None or device in s.devices)
            assert s.runs_on(device) == expected, (name, device)
        if not s.available:
            assert not s.runs_on("cpu") and not s.runs_on("cuda")
    assert status["reference"].available and status["reference"].devices is None
    assert status["cpp"].runs_on("cpu") == _lib.loaded()
    assert status["cpp"].runs_on("cuda") == (_lib.loaded() and _lib.cuda_kernels()
                                             and torch.cuda.is_available())


def test_backend_status_devices_and_runs_on():
    assert BackendStatus(True, "x", None).runs_on("xpu")
    assert BackendStatus(True, "x", ("cpu",)).runs_on("cpu")
    assert not BackendStatus(True, "x", ("cpu",)).runs_on("cuda")
    assert not BackendStatus(False, "x", None).runs_on("cpu")  # unavailable: runs nothing
    assert not BackendStatus(True, "x", ()).runs_on("cpu")


def test_cpu_tensors_take_the_cpp_backend_when_built():
    tensors = _cpu_grads()
    expected = _select.get(CPU_AUTO)
    assert _select.select(_select.parse(None), tensors) is expected
    assert _select.select(_select.parse("auto"), tensors) is expected
    assert _select.select(_select.parse(" Reference "), tensors) is _select.get("reference")
    assert _select.auto_name({"cpu"}) == CPU_AUTO
    assert fusedclip.select_backend(tensors) == CPU_AUTO
    assert fusedclip.select_backend(tensors[0]) == CPU_AUTO  # one tensor, as the functions take


def test_cpu_tensors_take_the_reference_without_the_engine(monkeypatch):
    """Without fusedclip._C, auto falls to the reference on the CPU, never to Triton's
    interpreter (a test tool), even where it runs."""
    _set_status(monkeypatch, "cpp", False, ())
    _set_status(monkeypatch, "triton", True, ("cpu",))
    assert fusedclip.select_backend(_cpu_grads()) == "reference"
    assert fusedclip.select_backend(_cpu_grads(), "triton") == "triton"  # when named, it runs


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 3).to_sparse(),
        lambda: torch.randn(5, dtype=torch.complex64),
        lambda: torch.randn(5, dtype=torch.complex128),
    ],
    ids=["sparse", "complex64", "complex128"],
)
def test_sparse_and_complex_go_to_the_reference(make):
    odd = make()
    assert fusedclip.select_backend([odd]) == "reference"
    assert fusedclip.select_backend([torch.randn(3), odd]) == "reference"  # one for all
    assert _select.auto_name({"cpu"}, kernels_take_them=False) == "reference"


@pytest.mark.parametrize("value", ["reference", "auto", "", "cpp", "triton", " CPP "])
def test_environment_override(value, monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", value)
    name = value.strip().lower()
    expected = CPU_AUTO if name in ("auto", "") else name
    status = fusedclip.available_backends()[expected]
    if not status.runs_on("cpu"):
        pytest.skip(f"{expected} on cpu: {status.reason}")
    choice = _select.parse(None)
    assert choice.source == "FUSEDCLIP_BACKEND"
    assert _select.select(choice, _cpu_grads()) is _select.get(expected)
    assert fusedclip.select_backend(_cpu_grads()) == expected


def test_environment_names_a_backend_that_cannot_run(monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "triton")
    _set_status(monkeypatch, "triton", False, ())
    params = make_params([(3,)])
    before = [g.clone() for g in grads(params)]
    with pytest.raises(RuntimeError, match=r"backend 'triton' \(from FUSEDCLIP_BACKEND\) cannot "
                                           r"run here: test"):
        fusedclip.clip_grad_norm_(params, 0.1)
    assert torch.equal(grads(params)[0], before[0])  # an error, never a silent fallback


def test_keyword_beats_environment(monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "turbo")
    assert _select.select(_select.parse("reference"), _cpu_grads()) is _select.get("reference")
    assert fusedclip.select_backend(_cpu_grads(), "reference") == "reference"
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "reference")
    assert fusedclip.select_backend(_cpu_grads(), "auto") == CPU_AUTO
    assert _select.parse("auto").source == "backend="


def test_cuda_alias_warns_and_refuses_cpu_tensors():
    """``"cuda"`` was the C++ engine on CUDA tensors: it still means that, with a FutureWarning,
    and CPU tensors are an error (not ``cpp`` on the CPU), gradients untouched."""
    with pytest.warns(FutureWarning, match="'cuda' is now called 'cpp'"):
        choice = _select.parse("cuda")
    assert choice == _select.Choice("cpp", "backend=", ("cuda",))
    with pytest.warns(FutureWarning, match="'cuda' is now called 'cpp'"):
        assert _select.parse(" CUDA ").only == ("cuda",)
    params = make_params([(3,), (4, 5)], seed=1)
    before = [g.clone() for g in grads(params)]
    cannot = r"backend 'cpp' \(from backend=\) runs cuda tensors here, but gradients\[0\] is on cpu"
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match=cannot):
        fusedclip.select_backend(grads(params), "cuda")
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match=cannot):
        fusedclip.clip_grad_norm_(params, 0.1, backend="cuda")
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match=cannot):
        fusedclip.get_total_norm(grads(params), backend="cuda")
    assert all(torch.equal(g, b) for g, b in zip(grads(params), before))


def test_cuda_alias_means_cpp_on_cuda_tensors(monkeypatch):
    _set_status(monkeypatch, "cpp", True, ("cpu", "cuda"))
    dense = _fake_cuda_tensors(lambda: torch.empty(4, device="cuda"))
    with pytest.warns(FutureWarning):
        assert fusedclip.select_backend(dense, "cuda") == "cpp"
    # Without the engine's CUDA kernels, the old name cannot run them either.
    _set_status(monkeypatch, "cpp", True, ("cpu",))
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError, match="runs cuda tensors"):
        fusedclip.select_backend(dense, "cuda")


def test_select_backend():
    tensors = _cpu_grads()
    for name, status in fusedclip.available_backends().items():
        if status.runs_on("cpu"):
            assert fusedclip.select_backend(tensors, name) == name
    with pytest.raises(ValueError, match="at least one tensor"):
        fusedclip.select_backend([])
    with pytest.raises(ValueError, match="unknown backend 'turbo' \\(from backend=\\)"):
        fusedclip.select_backend(tensors, "turbo")
    with pytest.raises(TypeError, match="backend must be a string"):
        fusedclip.select_backend(tensors, 3)


def test_select_backend_refuses_what_the_backend_cannot_run(monkeypatch):
    """The same error as the call would raise: a backend that runs no CUDA tensors here, named
    for CUDA tensors; and one that cannot run at all."""
    cuda = _fake_cuda_tensors(lambda: torch.empty(4, device="cuda"))
    _set_status(monkeypatch, "cpp", True, ("cpu",))
    with pytest.raises(RuntimeError, match=r"backend 'cpp' \(from backend=\) runs cpu tensors "
                                           r"here, but gradients\[0\] is on cuda"):
        fusedclip.select_backend(cuda, "cpp")
    _set_status(monkeypatch, "triton", False, ())
    with pytest.raises(RuntimeError, match=r"backend 'triton' \(from backend=\) cannot run "
                                           r"here: test"):
        fusedclip.select_backend(_cpu_grads(), "triton")


@pytest.mark.parametrize(
    "cpp_ok, triton_ok, expected",
    [(True, True, "cpp"), (False, True, "triton"), (False, False, "reference")],
)
def test_auto_prefers_cpp_then_triton_for_cuda_tensors(monkeypatch, cpp_ok, triton_ok, expected):
    # Triton is the automatic choice for CUDA tensors when fusedclip._C is not built with its
    # CUDA kernels. As on a GPU machine: Triton compiles for CUDA tensors (here it may be in
    # interpreter mode, CPU only).
    _set_status(monkeypatch, "cpp", True, ("cpu", "cuda") if cpp_ok else ("cpu",))
    _set_status(monkeypatch, "triton", triton_ok, ("cuda",) if triton_ok else ())
    dense = _fake_cuda_tensors(lambda: torch.empty(4, device="cuda"))
    assert _select.select(_select.parse(None), dense) is _select.get(expected)
    assert fusedclip.select_backend(dense) == expected
    assert _select.auto_name({"cuda"}) == expected
    # Complex gradients are the reference's, whatever else can run.
    cplx = _fake_cuda_tensors(lambda: torch.empty(4, dtype=torch.complex64, device="cuda"))
    assert fusedclip.select_backend(cplx) == "reference"
    # CPU and CUDA gradients together: one backend that runs both.
    both = [torch.empty(3), *dense]
    assert fusedclip.select_backend(both) == ("cpp" if cpp_ok else "reference")


def test_backends_command_says_what_auto_picks(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for name, status in fusedclip.available_backends().items():
        assert f"{name}: {status!r}" in out
    assert "auto picks, for dense floating gradients:" in out
    assert f"on CPU tensors:  {fusedclip.select_backend([torch.zeros(3)])}\n" in out
    if torch.cuda.is_available():
        cuda_pick = fusedclip.select_backend([torch.zeros(3, device="cuda")])
        assert f"on CUDA tensors: {cuda_pick}\n" in out
    else:
        assert "on CUDA tensors: - (no CUDA device is visible)" in out
    assert "sparse and complex gradients: reference" in out


# ---- the Backend contract -----------------------------------------------------------------------

def _protocol_members() -> list[str]:
    """The members of ``Backend``: its annotated attributes and its methods."""
    members = set(Backend.__annotations__)
    members |= {n for n, v in vars(Backend).items() if not n.startswith("_") and callable(v)}
    return sorted(members)


def _signature_mismatches(expected, actual) -> list[str]:
    """Why ``actual`` cannot be called as the Protocol method ``expected`` is (empty: it can).

    Positional parameters: the same names in the same order, of a kind that takes them by
    position and by name. Keyword-only ones: the same names in the same order. A default of the
    Protocol's must be the implementation's too; the implementation may add defaults, and
    parameters that have one (or ``*args``/``**kwargs``).
    Annotations are not compared.
    """
    want = list(inspect.signature(expected).parameters.values())[1:]  # without self
    have = list(inspect.signature(actual).parameters.values())
    P = inspect.Parameter
    problems = []
    positional = [p for p in have if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in have}
    matched = []
    want_positional = [p for p in want if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    for i, w in enumerate(want_positional):
        h = positional[i] if i < len(positional) else None
        if h is None or h.name != w.name:
            problems.append(f"positional parameter {i} should be {w.name!r}, is "
                            f"{h.name if h else None!r}")
            continue
        if w.kind == P.POSITIONAL_OR_KEYWORD and h.kind != w.kind:
            problems.append(f"{w.name!r} is {h.kind.description}, should be {w.kind.description}")
        matched.append(h)
    keyword_order = []
    for w in want:
        if w.kind != P.KEYWORD_ONLY:
            continue
        h = by_name.get(w.name)
        if h is None or h.kind not in (P.KEYWORD_ONLY, P.POSITIONAL_OR_KEYWORD):
            problems.append(f"keyword {w.name!r} is missing")
            continue
        keyword_order.append(list(by_name).index(w.name))
        matched.append(h)
    if keyword_order != sorted(keyword_order):
        problems.append("keyword-only parameters in another order")
    for w in want:
        h = by_name.get(w.name)
        if w.default is P.empty or h is None or h not in matched:
            continue
        if h.default is P.empty:
            problems.append(f"{w.name!r} has no default, should default to {w.default!r}")
        elif not (h.default == w.default or (isinstance(w.default, float) and math.isnan(w.default)
                                             and math.isnan(h.default))):
            problems.append(f"{w.name!r} defaults to {h.default!r}, should to {w.default!r}")
    for h in have:
        if h not in matched and h.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD) \
                and h.default is P.empty:
            problems.append(f"extra parameter {h.name!r} without a default")
    return problems


def _contract_violations(name: str, backend) -> list[str]:
    problems = []
    for member in _protocol_members():
        if not hasattr(backend, member):
            problems.append(f"{member}: missing")
            continue
        value = getattr(backend, member)
        if member == "NAME":
            if value != name:
                problems.append(f"NAME is {value!r}, registered as {name!r}")
            continue
        if not callable(value):
            problems.append(f"{member}: not callable")
            continue
        problems += [f"{member}: {p}" for p in
                     _signature_mismatches(getattr(Backend, member), value)]
    return problems


def test_protocol_members_are_the_ones_typing_sees():
    """The contract test below reads the Protocol's members as typing does."""
    members = set(_protocol_members())
    assert {"NAME", "status", "total_norm", "scale_", "clip_", "clip_with_norm_", "clip_stats_",
            "clip_per_tensor_", "clamp_", "adaptive_clip_", "clip_params",
            "norm_params"} <= members
    get_attrs = getattr(typing, "get_protocol_members", None) or getattr(
        typing, "_get_protocol_attrs", None)
    if get_attrs is not None:
        assert members == {m for m in get_attrs(Backend) if not m.startswith("_")}


@pytest.mark.parametrize("name", _select.BACKEND_NAMES)
def test_every_backend_meets_the_protocol(name):
    """Every member of ``Backend``, callable as the Protocol declares it."""
    assert _contract_violations(name, _select.get(name)) == []
    assert _select.get(name).status() == _select.backend_status(name)


class _Broken:
    """A backend with one fault of each kind the contract test must catch."""

    NAME = "broken"

    def status(self):
        return BackendStatus(True, "test", None)

    def total_norm(self, tensors, inv_scale=None, norm_type=2.0, found_inf=None):  # order
        raise NotImplementedError

    def scale_(self, tensors, factor):  # a renamed parameter
        raise NotImplementedError

    def clip_with_norm_(self, tensors, max_norm, norm, soft=True):  # another default
        raise NotImplementedError

    def clip_(self, tensors, max_norm, norm_type, inv_scale=None, found_inf=None):  # no soft
        raise NotImplementedError

    def clip_stats_(self, tensors, max_norm, norm_type, soft, per_tensor, extra):  # extra
        raise NotImplementedError

    def clip_per_tensor_(self, tensors, max_norms, norm_type, soft):  # default dropped
        raise NotImplementedError

    def clamp_(self, tensors, clip_value, /):  # positional only
        raise NotImplementedError

    def clip_params(self, params, max_norm, norm_type, *, soft=False, cuda_only=True,
                    inv_scale=None, found_inf=None):  # keywords reordered
        raise NotImplementedError

    def norm_params(self, params, max_norm, norm_type, cuda_only=True, inv_scale=None,
                    found_inf=None, soft=False):  # keywords that also take positions: fine
        raise NotImplementedError

    # adaptive_clip_: missing


def test_contract_test_catches_a_broken_backend():
    problems = _contract_violations("other", _Broken())
    joined = "\n".join(problems)
    for fault in ["NAME is 'broken'", "adaptive_clip_: missing",
                  "total_norm: positional parameter 1 should be 'norm_type'",
                  "scale_: positional parameter 1 should be 'coef'",
                  "clip_with_norm_: 'soft' defaults to True",
                  "clip_: positional parameter 5 should be 'soft'",
                  "clip_stats_: extra parameter 'extra'",
                  "clip_per_tensor_: 'soft' has no default",
                  "clamp_: 'clip_value' is positional-only",
                  "clip_params: keyword-only parameters in another order"]:
        assert fault in joined, joined
    assert not any(p.startswith(("norm_params", "status")) for p in problems), joined


@pytest.mark.gpu
def test_cuda_tensors_prefer_fused_backends():
    tensors = [torch.randn(10, device="cuda")]
    status = fusedclip.available_backends()
    expected = next((n for n in ("cpp", "triton") if status[n].runs_on("cuda")), "reference")
    assert _select.select(_select.parse(None), tensors) is _select.get(expected)
    assert fusedclip.select_backend(tensors) == expected


@pytest.mark.gpu
def test_cuda_alias_runs_cpp_on_cuda_tensors():
    if not fusedclip.available_backends()["cpp"].runs_on("cuda"):
        pytest.skip(f"cpp on cuda: {fusedclip.available_backends()['cpp'].reason}")
    params = make_params([(1000, 3), (7,)], device="cuda", seed=31)
    twin = make_params([(1000, 3), (7,)], device="cuda", seed=31)
    with pytest.warns(FutureWarning):
        norm = fusedclip.clip_grad_norm_(params, 0.5, backend="cuda")
    expected = fusedclip.clip_grad_norm_(twin, 0.5, backend="cpp")
    torch.testing.assert_close(norm, expected, rtol=0, atol=0)
    for g, t in zip(grads(params), grads(twin)):
        torch.testing.assert_close(g, t, rtol=0, atol=0)


@pytest.mark.gpu
def test_reference_backend_runs_on_cuda_tensors():
    params = make_params([(1000, 3), (7,), (0,)], torch.bfloat16, device="cuda", seed=30)
    cpu_twin = make_params([(1000, 3), (7,), (0,)], torch.bfloat16, seed=30)
    norm = fusedclip.clip_grad_norm_(params, 0.5, backend="reference")
    cpu_norm = fusedclip.clip_grad_norm_(cpu_twin, 0.5, backend="reference")
    assert norm.device.type == "cuda"
    torch.testing.assert_close(norm.cpu(), cpu_norm, rtol=0, atol=0)
    for g, c in zip(grads(params), grads(cpu_twin)):
        torch.testing.assert_close(g.cpu(), c, rtol=0, atol=0)
