"""The compiled operators of fusedclip._C: build, registration, opcheck, and the CUDA kernels.

CI builds the extension and sets FUSEDCLIP_REQUIRE_EXTENSION=1, so a missing build fails there
instead of skipping.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import BITS_DTYPE, DTYPES, assert_bitwise_equal, random_tensors

import fusedclip
from fusedclip import _extension, reference

if not _extension.loaded():
    if os.environ.get("FUSEDCLIP_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"fusedclip._C must be built here: {_extension.LOAD_ERROR}")
    pytest.skip(f"fusedclip._C is not built: {_extension.LOAD_ERROR}", allow_module_level=True)

# Sizes around the chunk (65536) and vector (16-byte) boundaries, plus empty and one element.
SIZES = [0, 1, 3, 7, 8, 9, 255, 65535, 65536, 65537, 3 * 65536 + 5]


def coef(value: float, device="cpu") -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, device=device)


def test_operators_are_registered():
    assert "scale_" in _extension.op_names()
    schema = str(torch.ops.fusedclip.scale_.default._schema)
    assert "Tensor(a!)[] tensors" in schema
    assert "fusedclip._C is built" in fusedclip.available_backends()["cuda"].reason


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_cpu(dtype):
    tensors = random_tensors([5, 0, 17], dtype) + [torch.randn(4, 6).to(dtype).t()]
    torch.library.opcheck(torch.ops.fusedclip.scale_, (tensors, coef(0.37)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_cpu_is_the_reference_bit_for_bit(dtype):
    tensors = random_tensors(SIZES[:8], dtype, seed=1)
    expected = [t.clone() for t in tensors]
    fusedclip.ops.scale_(tensors, coef(0.6180339887))
    reference.scale_(expected, coef(0.6180339887))
    assert_bitwise_equal(tensors, expected)


def with_odd_nan(t: torch.Tensor) -> torch.Tensor:
    """``t`` with one NaN of a non-canonical payload. A GPU that multiplies it writes its canonical
    NaN instead, so on CUDA unchanged bits prove nothing was written (x86 keeps payloads, so on the
    CPU they only prove nothing changed)."""
    odd = {torch.float32: 0x7FC01234, torch.float64: 0x7FF8000000001234,
           torch.float16: 0x7E12, torch.bfloat16: 0x7FD2}[t.dtype]
    as_ints = t.view(BITS_DTYPE[t.element_size()])
    as_ints[tuple(s // 2 for s in t.shape)] = odd
    assert t.isnan().sum() == 1
    return t


def test_scale_by_one_changes_nothing():
    tensors = [with_odd_nan(t) for t in random_tensors([10, 3], torch.bfloat16, seed=2)]
    before = [t.clone() for t in tensors]
    fusedclip.ops.scale_(tensors, coef(1.0))
    assert_bitwise_equal(tensors, before, nan_payloads=True)


@pytest.mark.parametrize(
    "tensors, c, match",
    [
        ([torch.ones(3)], torch.tensor(0.5), "coef must be float64"),
        ([torch.ones(3)], torch.ones(2, dtype=torch.float64), "coef must have one element"),
        ([torch.ones(3, dtype=torch.int32)], coef(0.5), r"tensors\[0\] has dtype Int"),
        ([torch.ones(3), torch.ones(2).to_sparse()], coef(0.5), "'SparseCPU' backend"),
        ([torch.ones(3), torch.ones(4, 4)[:, ::2]], coef(0.5), r"tensors\[1\] is a view with gaps"),
        ([torch.ones(3), torch.ones(1, 3).expand(2, 3)], coef(0.5), r"tensors\[1\] is a view"),
    ],
)
def test_scale_rejects_bad_arguments(tensors, c, match):
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fusedclip.scale_(tensors, c)
    for t, b in zip(tensors, before):
        assert torch.equal(t.to_dense(), b.to_dense())


def test_compiles_without_graph_breaks():
    def step(tensors, c):
        fusedclip.ops.scale_(tensors, c)
        return tensors[0] + 1

    tensors = random_tensors([9, 4], torch.float32, seed=3)
    expected = [t.clone() for t in tensors]
    reference.scale_(expected, coef(0.25))
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(tensors, coef(0.25))
    assert_bitwise_equal(tensors, expected)
    torch.testing.assert_close(out, expected[0] + 1)


# ---- CUDA ----------------------------------------------------------------------------------


def cuda_layouts(dtype, seed):
    """Dense, misaligned, aligned-offset, permuted and empty tensors; more than a table's worth."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).cuda()

    per_16_bytes = 16 // torch.tensor([], dtype=dtype).element_size()
    tensors = random_tensors(SIZES, dtype, "cuda", seed)
    tensors += [rand(4099)[1:], rand(65536 * 2 + 3)[3:], rand(300, 7).t()]  # scalar path, permuted
    tensors += [rand(70001 + per_16_bytes)[per_16_bytes:]]  # offset view that is still aligned
    tensors += [rand(n % 97) for n in range(300)]  # more tensors than one launch's table holds
    return tensors


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.3, 0.0, 1.0 - 2**-40, float("nan")])
def test_scale_cuda_is_the_reference_bit_for_bit(dtype, value):
    tensors = cuda_layouts(dtype, seed=4)
    expected = [t.cpu() for t in tensors]
    fusedclip.ops.scale_(tensors, coef(value, "cuda"))
    reference.scale_(expected, coef(value))
    assert_bitwise_equal([t.cpu() for t in tensors], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_cuda_by_one_writes_nothing(dtype):
    tensors = [with_odd_nan(t) if t.numel() else t for t in cuda_layouts(dtype, seed=5)]
    before = [t.clone() for t in tensors]
    fusedclip.ops.scale_(tensors, coef(1.0, "cuda"))
    assert_bitwise_equal(tensors, before, nan_payloads=True)


@pytest.mark.gpu
def test_scale_cuda_over_2_31_elements():
    n = 2**31 + 2**16 + 3  # past int32 indexing, with a ragged last chunk
    if torch.cuda.mem_get_info()[0] < 3 * n * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    t = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    t.view(-1)[: 2**20].normal_()
    t[2**20 :] = 1.5
    t[-5:] = torch.tensor([3.0, -2.0, 0.25, 7.0, -1.0])
    before = t.clone()
    fusedclip.ops.scale_([t], coef(0.3, "cuda"))
    for start in range(0, n, 2**28):  # compare in slices so the fp64 temporaries stay small
        chunk = before[start : start + 2**28]
        assert torch.equal(t[start : start + 2**28], (chunk.double() * 0.3).to(torch.bfloat16))


@pytest.mark.gpu
def test_scale_cuda_opcheck():
    tensors = random_tensors([5, 65537, 0], torch.bfloat16, "cuda", seed=6)
    torch.library.opcheck(torch.ops.fusedclip.scale_, (tensors, coef(0.5, "cuda")))


@pytest.mark.gpu
def test_scale_cuda_graph_capture_reads_coef_at_replay():
    tensors = random_tensors([1000, 70000, 3] + [n % 50 for n in range(200)], torch.float32,
                             "cuda", seed=7)
    original = [t.clone() for t in tensors]
    c = coef(1.0, "cuda")
    fusedclip.ops.scale_(tensors, c)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fusedclip.ops.scale_(tensors, c)
    c.fill_(0.5)
    graph.replay()
    expected = [t.clone() for t in original]
    reference.scale_(expected, coef(0.5, "cuda"))
    assert_bitwise_equal(tensors, expected)


@pytest.mark.gpu
def test_scale_cuda_rejects_tensors_on_another_device():
    with pytest.raises(RuntimeError, match=r"coef is on cuda:0 but tensors\[0\] is on cpu"):
        torch.ops.fusedclip.scale_([torch.ones(3)], coef(0.5, "cuda"))


@pytest.mark.gpu
def test_scale_cuda_rejects_views_with_gaps_before_any_launch():
    first = torch.ones(5, device="cuda")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is a view with gaps"):
        torch.ops.fusedclip.scale_([first, torch.ones(4, 4, device="cuda")[:, ::2]],
                                   coef(0.5, "cuda"))
    assert torch.equal(first, torch.ones(5, device="cuda"))
