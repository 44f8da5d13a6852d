"""``fusedclip.patch()``: torch's clipping functions routed through fusedclip.

Unit tests check what is replaced and restored, and that each routed function gives torch's
results. Integration tests train a tiny randomly initialised model for a few steps with HF
``transformers.Trainer`` (through accelerate) and with a Lightning ``Trainer``
(``gradient_clip_val``), patched and unpatched, and compare the trained weights; they are skipped
when those packages are not installed.
"""

from __future__ import annotations

import collections
import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.utils
import torch.nn.utils.clip_grad
from gradients import clone_params, make_params

import fusedclip
from fusedclip import api, torch_patch
from fusedclip.backends import reference

pytestmark = pytest.mark.slow

NAMES = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]
SHAPES = [(33, 17), (70001,), (5,), (1,), (0,), (64, 3, 3)]


def _torch_calls(name, params, grads):
    """Each function called as a user of torch calls it."""
    fn = getattr(torch.nn.utils, name)
    if name == "clip_grad_norm_":
        return fn(params, 0.5, 2.0)
    if name == "clip_grad_value_":
        return fn(params, 0.01)
    if name == "get_total_norm":
        return fn(grads, 3.0)  # (torch 2.14 refuses the inf-norm with an empty tensor)
    return fn(params, 0.5, torch.tensor(3.0))


def test_patch_replaces_and_unpatch_restores():
    originals = {n: getattr(torch.nn.utils, n) for n in NAMES}
    alias = torch.nn.utils.clip_grad.clip_grad_norm_
    assert not fusedclip.is_patched()
    fusedclip.patch()
    try:
        assert fusedclip.is_patched()
        for n in NAMES:
            assert getattr(torch.nn.utils, n) is not originals[n]
            assert getattr(torch.nn.utils, n).__name__ == originals[n].__name__  # wraps torch's
        assert torch.nn.utils.clip_grad.clip_grad_norm_ is torch.nn.utils.clip_grad_norm_
        fusedclip.patch()  # again: still one layer, unpatch restores torch's
    finally:
        fusedclip.unpatch()
    assert all(getattr(torch.nn.utils, n) is originals[n] for n in NAMES)
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is alias
    assert not fusedclip.is_patched()
    fusedclip.unpatch()  # a no-op


def test_patched_context_nests_and_restores_on_error():
    with fusedclip.patched(backend="reference"):
        outer = torch.nn.utils.clip_grad_norm_
        with pytest.raises(RuntimeError, match="inside"), fusedclip.patched():
            assert torch.nn.utils.clip_grad_norm_ is not outer
            raise RuntimeError("inside")
        assert torch.nn.utils.clip_grad_norm_ is outer  # the outer patch, not torch's
    assert not fusedclip.is_patched()
    with pytest.raises(ValueError, match="backend"):
        fusedclip.patch(backend="nope")
    assert not fusedclip.is_patched()


@pytest.mark.parametrize("name", NAMES)
def test_patched_functions_route_and_match_torch(backend, device, name):
    params = make_params(SHAPES, device=device, seed=11)
    twin = clone_params(params)
    expected = _torch_calls(name, twin, [p.grad for p in twin])
    real = getattr(api, name)
    with mock.patch.object(api, name, wraps=real) as spy, fusedclip.patched(backend=backend):
        got = _torch_calls(name, params, [p.grad for p in params])
    assert spy.call_count == 1
    assert spy.call_args.kwargs["backend"] == backend
    # torch sums in fp32 and derives the coefficient from that rounded norm: a few ulps apart.
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=0)
    if name == "clip_grad_value_":  # no sums: torch's results exactly
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, twin))


def test_patch_checks_the_backend_name_now():
    """An unknown name is refused at patch() time; the old name "cuda" warns there (and means
    the C++ engine on CUDA tensors, see tests/api/test_dispatch.py)."""
    with pytest.warns(FutureWarning, match="'cuda' is now called 'cpp'"):
        fusedclip.patch(backend="cuda")
    try:
        assert fusedclip.is_patched()
    finally:
        fusedclip.unpatch()
    with pytest.raises(ValueError, match="unknown backend 'cuda-ops-on-cpu'"):
        fusedclip.patch(backend="cuda-ops-on-cpu")
    assert not fusedclip.is_patched()


def test_deprecated_alias_and_fusedclip_errors_follow():
    params = make_params(SHAPES, seed=12)
    before = [p.grad.clone() for p in params]
    with fusedclip.patched(backend="reference"):
        with pytest.warns(FutureWarning):
            torch.nn.utils.clip_grad_norm(params, 1e6)  # torch's deprecated name, routed
        with pytest.raises(ValueError, match="max_norm"):
            torch.nn.utils.clip_grad_norm_(params, -1.0)  # torch would flip the gradients
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_torch_function_is_torch_s_while_patched():
    with fusedclip.patched():
        fn = torch_patch.torch_function("clip_grad_norm_")
        assert fn is not torch.nn.utils.clip_grad_norm_
        assert fn.__module__ == "torch.nn.utils.clip_grad"


# ---- frameworks ---------------------------------------------------------------------------------


# The reference backend's primitives: every norm it takes, every scaling and every clamp it does
# go through one of these.
_WORK = ("total_norm", "scale_", "clamp_")


@contextlib.contextmanager
def _fusedclip_traffic():
    """Counts the calls of every function ``patch()`` routes to fusedclip (whichever of them a
    framework uses: accelerate 1.16 calls ``get_total_norm`` and ``clip_grads_with_norm_``, older
    releases ``clip_grad_norm_``), and of the reference backend's primitives that do the work, so
    that "went through fusedclip" means the backend ran, not just that an entry point was hit."""
    counts = collections.Counter()

    def spy(module, name, key):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        return mock.patch.object(module, name, counted)

    with contextlib.ExitStack() as stack:
        for name in NAMES:
            stack.enter_context(spy(api, name, name))
        for name in _WORK:
            stack.enter_context(spy(reference, name, f"reference.{name}"))
        yield counts


def _trainer_weights(tmp_path, patch):
    """3 steps of HF Trainer on a tiny random GPT-2 with clipping active."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2,
                                     n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (12, 16), generator=gen)
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        max_grad_norm=0.05, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    with _fusedclip_traffic() as counts:
        if patch:
            with fusedclip.patched(backend="reference"):
                trainer.train()
        else:
            trainer.train()
    return [p.detach().clone() for p in model.parameters()], counts


def test_hf_trainer_patched_matches_unpatched(tmp_path):
    ours, counts = _trainer_weights(tmp_path / "a", patch=True)
    theirs, unpatched = _trainer_weights(tmp_path / "b", patch=False)
    # Every step's norm taken and every step's gradients scaled by fusedclip's reference backend,
    # through whichever of torch's functions the installed accelerate calls.
    assert counts["clip_grad_norm_"] + counts["get_total_norm"] == 3, counts
    assert counts["clip_grad_norm_"] + counts["clip_grads_with_norm_"] == 3, counts
    assert counts["reference.total_norm"] == counts["reference.scale_"] == 3, counts
    assert not unpatched, unpatched
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _lightning_weights(algorithm, patch):
    pl = pytest.importorskip("pytorch_lightning")

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                           torch.nn.Linear(32, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    model = Tiny()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 8, generator=gen)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True) * 10)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    trainer = pl.Trainer(max_steps=4, gradient_clip_val=0.05, gradient_clip_algorithm=algorithm,
                         accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with _fusedclip_traffic() as counts:
        if patch:
            with fusedclip.patched(backend="reference"):
                trainer.fit(model, loader)
        else:
            trainer.fit(model, loader)
    return [p.detach().clone() for p in model.parameters()], counts


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_lightning_gradient_clip_patched_matches_unpatched(algorithm):
    ours, counts = _lightning_weights(algorithm, patch=True)
    theirs, unpatched = _lightning_weights(algorithm, patch=False)
    if algorithm == "norm":
        assert counts["clip_grad_norm_"] + counts["get_total_norm"] == 4, counts
        assert counts["clip_grad_norm_"] + counts["clip_grads_with_norm_"] == 4, counts
        assert counts["reference.total_norm"] == counts["reference.scale_"] == 4, counts
    else:
        assert counts["clip_grad_value_"] == counts["reference.clamp_"] == 4, counts
    assert not unpatched, unpatched
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
