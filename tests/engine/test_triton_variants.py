"""The Triton backend's run-time variants (``FUSEDCLIP_TRITON_VARIANT``: tile, depth, warps,
register cap; docs/performance.md): each gives the same results, so a device run can sweep them."""

from __future__ import annotations

import pytest
import torch

import fusedclip
from fusedclip.backends import triton as tb

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fusedclip.available_backends()["triton"].runs_on(DEVICE),
                                reason=f"triton cannot run on {DEVICE} here")


def test_parsing():
    assert tb._parse_variant("") == tb.Variant()
    assert tb._parse_variant(" tile=16384, depth=1 ") == tb.Variant(tile=16384, depth=1)
    for bad in ("tile=3000", "depth=3", "speed=1", "tile", "warps=6", "maxnreg=-1"):
        with pytest.raises(ValueError, match="FUSEDCLIP_TRITON_VARIANT"):
            tb._parse_variant(bad)


@pytest.mark.parametrize("text", ["tile=4096,depth=1,maxnreg=0,persist=0",
                                  "tile=16384,depth=2,warps=4,persist=1"])
def test_every_variant_gives_the_same_results(monkeypatch, text):
    """Tensors ending inside a tile, on a row boundary, a few elements past one, and spanning
    chunks: the norms (p = 1, 2, inf), the clip and clamp match the default variant (the max and
    the clamp bit for bit; sums may be added in another order)."""
    gen = torch.Generator().manual_seed(0)
    sizes = (1, 7, 8, 9, 1000, 4099, 65536 + 13)
    grads = [(torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dt)
             for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64)
             for n in sizes]
    grads[3][5] = float("inf")  # one non-finite tensor only for p = inf below

    def results():
        out = [fusedclip.get_total_norm(grads[4:], p, backend="triton") for p in (1.0, 2.0)]
        out.append(fusedclip.get_total_norm(grads, float("inf"), backend="triton"))
        clipped = [g.clone() for g in grads[4:]]
        fusedclip.clip_grad_norm_(clipped, 0.5, backend="triton")
        clamped = [g.clone() for g in grads[4:]]
        fusedclip.clip_grad_value_(clamped, 0.25, backend="triton")
        return out + clipped + clamped

    monkeypatch.delenv("FUSEDCLIP_TRITON_VARIANT", raising=False)
    default = results()
    monkeypatch.setenv("FUSEDCLIP_TRITON_VARIANT", text)
    other = results()
    n = len(grads) - 4
    for a, b in zip(default[:2], other[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for a, b in zip(default[3:3 + n], other[3:3 + n], strict=True):
        torch.testing.assert_close(a, b)  # the dtype's tolerance: a coefficient's last bit
    assert torch.equal(default[2], other[2])  # the max: exact
    for a, b in zip(default[-n:], other[-n:], strict=True):
        assert torch.equal(a, b)  # the clamp: exact
