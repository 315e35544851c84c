"""The fused layer kernels (sedac.plugins.triton_fused) against PyTorch's ops in HF transformers' order (on CPU
via TRITON_INTERPRET=1, on the GPU when there is one)."""

import pytest
import torch
import torch.nn.functional as F

from sedac.plugins import triton_fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _close(a, b, dtype):
    """fp32: to the last bits; half: within one rounding step of the dtype (sums may add in another order)."""
    tol = 2e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def _hf_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 1000])
def test_rms_norm_and_residual_add(dtype, hidden):
    g = torch.Generator().manual_seed(hidden)
    x, delta = (torch.randn(5, hidden, generator=g).to(DEVICE, dtype) for _ in range(2))
    w = (torch.rand(hidden, generator=g) + 0.5).to(DEVICE, dtype)
    _close(triton_fused.rms_norm(x, w, 1e-5), _hf_norm(x, w, 1e-5), dtype)
    total, normed = triton_fused.rms_norm(x, w, 1e-5, delta)
    assert torch.equal(total, x + delta)  # one rounding of the sum, as PyTorch's add
    _close(normed, _hf_norm(x + delta, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_strided_heads(dtype):
    g = torch.Generator().manual_seed(0)
    t, heads, d = 4, 6, 64
    qkv = torch.randn(t, heads + 2, d, generator=g).to(DEVICE, dtype)
    x = qkv[:, :heads]  # a strided view, as q and k are sliced from the fused projection
    angles = torch.rand(t, 1, d // 2, generator=g) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(DEVICE, dtype)
    signed_sin = torch.cat((-angles.sin(), angles.sin()), -1).to(DEVICE, dtype)
    expected = x * cos + x.roll(d // 2, dims=-1) * signed_sin
    _close(triton_fused.rotary(x, cos, signed_sin), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_write(dtype):
    """q rotated out; K rotated and V copied into the caches at each token's slot, other slots untouched."""
    g = torch.Generator().manual_seed(2)
    t, heads, kv, d = 3, 4, 2, 64
    qkv = torch.randn(t, (heads + 2 * kv) * d, generator=g).to(DEVICE, dtype)
    angles = torch.rand(t, 1, d // 2, generator=g) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(DEVICE, dtype)
    signed_sin = torch.cat((-angles.sin(), angles.sin()), -1).to(DEVICE, dtype)
    k_cache, v_cache = (torch.full((10, kv, d), 7.0, dtype=dtype, device=DEVICE) for _ in range(2))
    slots = torch.tensor([8, 1, 5], device=DEVICE)
    q = triton_fused.rotary_and_cache(qkv, cos, signed_sin, slots, k_cache, v_cache, heads)
    q_and_k = qkv[:, : (heads + kv) * d].view(t, heads + kv, d)
    rotated = q_and_k * cos + q_and_k.roll(d // 2, dims=-1) * signed_sin
    _close(q, rotated[:, :heads], dtype)
    _close(k_cache[slots], rotated[:, heads:], dtype)
    assert torch.equal(v_cache[slots], qkv[:, (heads + kv) * d :].view(t, kv, d))
    others = [s for s in range(10) if s not in slots.tolist()]
    assert (k_cache[others] == 7).all() and (v_cache[others] == 7).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(3, 2 * 1500, generator=g) * 4).to(DEVICE, dtype)  # 1,500: a partial second block
    gate, up = gate_up.chunk(2, dim=-1)
    _close(triton_fused.silu_and_mul(gate_up), F.silu(gate) * up, dtype)


def test_empty_batches():
    x = torch.empty(0, 64, device=DEVICE)
    assert triton_fused.rms_norm(x, torch.ones(64, device=DEVICE), 1e-5).shape == (0, 64)
    assert triton_fused.silu_and_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)
