"""SEDAC ops: the torch reference is right, each Triton kernel matches it (on CPU via TRITON_INTERPRET=1,
on the GPU when there is one), and the custom ops are registered correctly."""

import math

import pytest
import torch

from sedac.models.quant import pack_nibbles
from sedac.plugins import reference
from sedac.plugins import triton_kernels as kernels
from sedac.plugins import triton_linear as linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_reference_entropy_limits():
    v = 1000
    assert reference.entropy(torch.zeros(2, v)).tolist() == pytest.approx([math.log(v)] * 2, rel=1e-6)
    peaked = torch.full((1, v), -1e4)
    peaked[0, 3] = 0.0
    assert reference.entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    x = torch.randn(3, 50)
    p = x.softmax(-1)
    assert torch.allclose(reference.entropy(x), -(p * p.log()).sum(-1), atol=1e-6)


@pytest.mark.parametrize("n,v", [(1, 49152), (7, 1000), (16, 1024), (0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_entropy_kernel_matches_reference(n, v, dtype):
    logits = (torch.randn(n, v) * 3).to(dtype).to(DEVICE)
    assert torch.allclose(kernels.entropy(logits).cpu(), reference.entropy(logits).cpu(), atol=2e-4, rtol=1e-5)


def test_reference_margin():
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0], [5.0, -1e4, -1e4]])
    p = logits.softmax(-1)
    assert reference.margin(logits).tolist() == pytest.approx([float(p[0, 0] - p[0, 1]), 0.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("n,v", [(1, 49152), (7, 1000), (16, 1024), (0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_margin_kernel_matches_reference(n, v, dtype):
    logits = (torch.randn(n, v) * torch.linspace(0.5, 12, max(n, 1))[:n, None]).to(dtype).to(DEVICE)
    if n > 2:  # ties: a repeated maximum within one block and across blocks
        logits[1, 5] = logits[1, 9] = logits[1].max() + 1
        logits[2, 3] = logits[2, v - 1] = logits[2].max() + 1
    assert torch.allclose(kernels.margin(logits).cpu(), reference.margin(logits).cpu(), atol=2e-5)


def test_exit_decision_kernel_matches_reference():
    logits = torch.randn(64, 3000, device=DEVICE) * torch.linspace(0.1, 8, 64, device=DEVICE)[:, None]
    h_ref = reference.entropy(logits)
    thresholds = h_ref + torch.where(torch.arange(64, device=DEVICE) % 2 == 0, 0.05, -0.05)  # half exit
    h, exits = kernels.exit_decision(logits, thresholds)
    assert torch.allclose(h, h_ref, atol=2e-4)
    assert exits.tolist() == [i % 2 == 0 for i in range(64)]


@pytest.mark.parametrize("m", [1, 7, 40])
def test_kv_predict_kernel_matches_reference(m):
    hidden = torch.randn(m, 576, device=DEVICE)
    weight = torch.randn(576, 2 * 3 * 64 * 2, device=DEVICE) * 0.05
    bias = torch.randn(2 * 3 * 64 * 2, device=DEVICE)
    assert torch.allclose(
        linear.kv_predict(hidden, weight, bias), reference.kv_predict(hidden, weight, bias), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_kernel_matches_reference(m, bias):
    x = torch.randn(m, 200, device=DEVICE)
    weight = torch.randint(-127, 128, (70, 200), dtype=torch.int8, device=DEVICE)
    scale = torch.rand(70, device=DEVICE) / 127
    b = torch.randn(70, device=DEVICE) if bias else None
    expected = reference.int8_linear(x, weight, scale, b)
    assert torch.allclose(expected, (x @ (weight.float() * scale[:, None]).t()) + (b if bias else 0), atol=1e-4)
    assert torch.allclose(linear.int8_linear(x, weight, scale, b), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_block_linear_kernel_matches_reference(bits, m):
    """int4 / gguf block weights on CUDA (here under TRITON_INTERPRET=1): dequantized per tile in registers."""
    from sedac.models.quant import BlockWeight, pack_nibbles

    g = torch.Generator().manual_seed(m)
    out, k, group = 70, 192, 32 if bits == 4 else 64
    scale = (torch.rand(out, k // group, generator=g) * 0.05 + 0.01).half().to(DEVICE)
    if bits == 4:
        codes = pack_nibbles(torch.randint(0, 16, (out, k), generator=g, dtype=torch.uint8)).to(DEVICE)
        minimum = (torch.randn(out, k // group, generator=g) * 0.1).half().to(DEVICE)
    else:
        codes, minimum = torch.randint(-127, 128, (out, k), generator=g, dtype=torch.int8).to(DEVICE), None
    x, b = torch.randn(m, k, device=DEVICE), torch.randn(out, device=DEVICE)
    dense = BlockWeight(codes.cpu(), scale.cpu(), None if minimum is None else minimum.cpu(), out).dense().to(DEVICE)
    expected = reference.block_linear(x, codes, scale, minimum, b)
    assert torch.allclose(expected, x @ dense.t() + b, atol=1e-4, rtol=1e-4)
    assert torch.allclose(linear.block_linear(x, codes, scale, minimum, b), expected, atol=1e-3, rtol=1e-4)


def test_custom_ops_registered_and_consistent():
    import sedac.plugins  # noqa: F401  (registers torch.ops.sedac.*)

    logits = torch.randn(5, 300, device=DEVICE)
    thresholds = torch.full((5,), 5.0, device=DEVICE)
    h, exits = torch.ops.sedac.exit_decision(logits, thresholds)
    assert torch.allclose(h, reference.entropy(logits), atol=2e-4) and exits.dtype == torch.bool
    assert torch.allclose(torch.ops.sedac.entropy(logits), h, atol=1e-5)
    assert torch.allclose(torch.ops.sedac.margin(logits), reference.margin(logits), atol=1e-5)
    w, b = torch.randn(300, 24, device=DEVICE), torch.randn(24, device=DEVICE)
    assert torch.allclose(torch.ops.sedac.kv_predict(logits, w, b), logits @ w + b, atol=1e-4)
    for op, args in (
        (torch.ops.sedac.entropy.default, (logits,)),
        (torch.ops.sedac.margin.default, (logits,)),
        (torch.ops.sedac.exit_decision.default, (logits, thresholds)),
        (torch.ops.sedac.kv_predict.default, (logits, w, b)),
        (torch.ops.sedac.int8_linear.default, (logits, w.t().to(torch.int8).contiguous(), b, None)),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.fixture
def small_gemv_tiles(monkeypatch):
    """GEMV tiles as a large layer gets them, at test sizes: 4 SMs and 64- or 128-input steps."""
    monkeypatch.setattr(linear, "_sm_count", lambda device: 4)
    monkeypatch.setattr(linear, "GEMV_MAX_BK", 64)
    return monkeypatch


def assert_close_in(out: torch.Tensor, expected: torch.Tensor, atol: float):
    """fp32 to atol; fp16 to a couple of its ulps (both sum in fp32, in other orders, then round)."""
    assert out.dtype == expected.dtype
    tol = dict(atol=atol, rtol=1e-4) if out.dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    assert torch.allclose(out.float(), expected.float(), **tol)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_linear_gemv_matches_reference(small_gemv_tiles, m, bias, dtype):
    """Decode rows (M <= GEMV_MAX_M) on the GEMV, N and K off the tile sizes: 37 outputs in tiles of 8,
    100 inputs in steps of 64."""
    n, k = 37, 100
    assert linear._gemv_grid(n, k, 1, torch.device(DEVICE)) == (8, 64, 128, 1)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    scale = torch.rand(n, device=DEVICE) / 127
    b = torch.randn(n, device=DEVICE) if bias else None
    assert_close_in(linear.int8_linear(x, weight, scale, b), reference.int8_linear(x, weight, scale, b), 1e-4)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bits,has_min", [(4, True), (4, False), (8, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_linear_gemv_matches_reference(small_gemv_tiles, m, bits, has_min, dtype):
    """Block weights on the GEMV, with and without minimums and a bias: 37 outputs in tiles of 8, K = 7 groups
    of 32 in steps of 128."""
    small_gemv_tiles.setattr(linear, "GEMV_MAX_BK", 128)
    g = torch.Generator().manual_seed(m * bits)
    n, k, group = 37, 224, 32
    assert linear._gemv_grid(n, k, group, torch.device(DEVICE)) == (8, 128, 256, 1)
    scale = (torch.rand(n, k // group, generator=g) * 0.05 + 0.01).half().to(DEVICE)
    if bits == 4:
        codes = pack_nibbles(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)).to(DEVICE)
    else:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
    minimum = (torch.randn(n, k // group, generator=g) * 0.1).half().to(DEVICE) if has_min else None
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(DEVICE) if m != 3 else None
    out = linear.block_linear(x, codes, scale, minimum, b)
    assert_close_in(out, reference.block_linear(x, codes, scale, minimum, b), 1e-3)


@pytest.mark.parametrize("op,bias", [("int8", True), ("int4", False), ("q8", True)])
def test_gemv_split_k(small_gemv_tiles, op, bias):
    """A long K over few outputs: slices of K in parallel programs, summed in a second kernel (then the bias)."""
    g = torch.Generator().manual_seed(len(op))
    n, k, group = 20, 13 * 32, 1 if op == "int8" else 32
    assert linear._gemv_grid(n, k, group, torch.device(DEVICE))[3] > 1
    x, b = torch.randn(2, k, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE) if bias else None
    if op == "int8":
        weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
        scale = (torch.rand(n, generator=g) / 127).to(DEVICE)
        out, expected = linear.int8_linear(x, weight, scale, b), reference.int8_linear(x, weight, scale, b)
    else:
        scale = (torch.rand(n, k // group, generator=g) * 0.05 + 0.01).half().to(DEVICE)
        if op == "int4":
            codes = pack_nibbles(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)).to(DEVICE)
            minimum = (torch.randn(n, k // group, generator=g) * 0.1).half().to(DEVICE)
        else:
            codes, minimum = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE), None
        out = linear.block_linear(x, codes, scale, minimum, b)
        expected = reference.block_linear(x, codes, scale, minimum, b)
    assert torch.allclose(out, expected, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("op", ["int8", "int4"])
def test_weight_only_dot_path_half_activations(op):
    """Above GEMV_MAX_M rows, fp16 activations dot on tensor cores: the weights converted to fp16 (int8
    exactly; dequantized 4-bit weights round to fp16's 11 bits), accumulated in fp32."""
    g = torch.Generator().manual_seed(0)
    m, n, k, group = linear.GEMV_MAX_M + 4, 70, 192, 32
    x, b = torch.randn(m, k, generator=g).half().to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    if op == "int8":
        weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
        scale = (torch.rand(n, generator=g) / 127).to(DEVICE)
        out, expected = linear.int8_linear(x, weight, scale, b), reference.int8_linear(x, weight, scale, b)
    else:
        codes = pack_nibbles(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)).to(DEVICE)
        scale = (torch.rand(n, k // group, generator=g) * 0.05 + 0.01).half().to(DEVICE)
        minimum = (torch.randn(n, k // group, generator=g) * 0.1).half().to(DEVICE)
        out = linear.block_linear(x, codes, scale, minimum, b)
        expected = reference.block_linear(x, codes, scale, minimum, b)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), expected.float(), atol=1e-2, rtol=5e-3)
