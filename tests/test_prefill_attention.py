"""The causal prefill attention kernel (csrc/prefill_attention.cpp): a prompt chunk's rows over their
sequence's paged K/V match a plainly written causal softmax attention, for grouped and plain multi-head
shapes, with and without cached positions before the chunk, on fp32 and half pools; the runner's prefill
takes it and agrees with the SDPA path; positions outside the block table are rejected."""

import pytest
import torch

from sedac.models import PrefillChunk, attention, cpu_kernels

BS = 4

pytestmark = pytest.mark.skipif(
    not cpu_kernels.causal_prefill(), reason="the causal prefill kernel is built for AVX-512 CPUs"
)


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def _case(h, kv, d, n, cached, dtype=torch.float32):
    """q [n, H, D], pools [slots, KV, D] and a shuffled block table holding cached + n positions."""
    torch.manual_seed(n * 31 + cached)
    blocks = -(-(cached + n) // BS)
    table = torch.randperm(blocks + 3)[:blocks]  # blocks out of order, some of the pool unused
    k_cache = torch.randn((blocks + 3) * BS, kv, d).to(dtype)
    v_cache = torch.randn((blocks + 3) * BS, kv, d).to(dtype)
    return torch.randn(n, h, d), k_cache, v_cache, table


def _reference(q, k_cache, v_cache, table, cached):
    """Every row i attends to positions [0, cached + i] of the table, softmax written out plainly."""
    n, h, d = q.shape
    length = cached + n
    slots = torch.tensor([int(table[p // BS]) * BS + p % BS for p in range(length)])
    group = h // k_cache.shape[1]
    keys = k_cache[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
    values = v_cache[slots].float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, keys) / d**0.5
    causal = torch.arange(length)[None, :] <= cached + torch.arange(n)[:, None]  # [n, L]
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hnl,lhd->nhd", weights, values)


@pytest.mark.parametrize("heads", [(6, 2, 16), (9, 3, 64), (4, 4, 32), (14, 2, 64), (13, 1, 16)])
@pytest.mark.parametrize("n, cached", [(1, 0), (13, 0), (40, 0), (7, 21), (33, 50)])
def test_matches_causal_softmax(heads, n, cached):
    q, k_cache, v_cache, table = _case(*heads, n, cached)
    out = torch.ops.sedac_cpu.prefill_attention(q, k_cache, v_cache, table, cached, BS, heads[2] ** -0.5)
    assert torch.allclose(out, _reference(q, k_cache, v_cache, table, cached), atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_pools_are_widened(dtype):
    q, k_cache, v_cache, table = _case(9, 3, 64, 20, 11, dtype)
    out = torch.ops.sedac_cpu.prefill_attention(q, k_cache, v_cache, table, 11, BS, 64**-0.5)
    assert torch.allclose(out, _reference(q, k_cache, v_cache, table, 11), atol=2e-6)


@pytest.mark.parametrize("cached", [0, 30])
def test_runner_prefill_takes_the_kernel(cached, monkeypatch):
    n = 24  # longer than the decode kernel's short chunks
    q, k_cache, v_cache, table = _case(6, 2, 16, n, cached)
    slots = torch.tensor([int(table[p // BS]) * BS + p % BS for p in range(cached, cached + n)])
    k, v = k_cache[slots], v_cache[slots]  # this step's K/V, already written to the pool
    lengths = torch.arange(cached + 1, cached + 1 + n) if cached else None
    chunk = PrefillChunk(0, n, table, lengths, cached)
    calls = []
    kernel = torch.ops.sedac_cpu.prefill_attention

    def counted(*args):
        calls.append(args)
        return kernel(*args)

    monkeypatch.setattr(torch.ops.sedac_cpu, "prefill_attention", counted)
    fast = attention._prefill_attention(q, k, v, k_cache, v_cache, chunk, BS)
    assert len(calls) == 1
    monkeypatch.setattr(cpu_kernels, "causal_prefill", lambda: False)
    sdpa = attention._prefill_attention(q, k, v, k_cache, v_cache, chunk, BS)
    assert len(calls) == 1 and torch.allclose(fast, sdpa, atol=2e-6)


def test_rejects_positions_beyond_table():
    q, k_cache, v_cache, table = _case(6, 2, 16, 8, 0)
    with pytest.raises(RuntimeError, match="outside the block table"):
        torch.ops.sedac_cpu.prefill_attention(q, k_cache, v_cache, table, 1, BS, 0.25)
