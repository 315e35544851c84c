"""SEDAC ops: the torch reference is right, each Triton kernel matches it (on CPU via TRITON_INTERPRET=1,
on the GPU when there is one), and the custom ops are registered correctly."""

import math

import pytest
import torch

from sedac.plugins import reference
from sedac.plugins import triton_kernels as kernels

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
        kernels.kv_predict(hidden, weight, bias), reference.kv_predict(hidden, weight, bias), atol=1e-4, rtol=1e-4
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
    assert torch.allclose(kernels.int8_linear(x, weight, scale, b), expected, atol=1e-4, rtol=1e-4)


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
    assert torch.allclose(kernels.block_linear(x, codes, scale, minimum, b), expected, atol=1e-3, rtol=1e-4)


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
