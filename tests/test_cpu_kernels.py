"""The C++ CPU paged-attention kernel: it compiles here, matches an independent per-sequence softmax
attention, agrees with the portable SDPA path on decodes and on short chunks after a cached context,
and rejects lengths outside a block table."""
import pytest
import torch

from sedac.models import AttentionContext, PrefillChunk, attention, cpu_kernels

BS, KV, H, D, NUM_BLOCKS = 4, 2, 6, 16, 40


@pytest.fixture
def pool():
    torch.manual_seed(0)
    return torch.randn(NUM_BLOCKS * BS, KV, D), torch.randn(NUM_BLOCKS * BS, KV, D)


def _reference(q, k_cache, v_cache, table, length):
    """One query row [H, D] over the first `length` positions of one block table, written out plainly."""
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(length)])
    keys = k_cache[slots].repeat_interleave(H // KV, dim=1)              # [L, H, D]
    values = v_cache[slots].repeat_interleave(H // KV, dim=1)
    weights = (torch.einsum("hd,lhd->hl", q, keys) / D ** 0.5).softmax(-1)
    return torch.einsum("hl,lhd->hd", weights, values)


def _tables(lengths):
    perm = torch.randperm(NUM_BLOCKS).tolist()       # scattered blocks, as after preemption and reuse
    width = -(-max(lengths) // BS)
    return [perm[i * width:(i + 1) * width] for i in range(len(lengths))]


def test_kernel_compiles_here():
    assert cpu_kernels.available()    # CI must exercise the kernel, not silently fall back


def test_kernel_matches_plain_attention(pool):
    lengths = [1, 3, 4, 5, 17, 23]                   # a lone token, partial and exactly full last blocks
    tables = _tables(lengths)
    q = torch.randn(len(lengths), H, D)
    out = cpu_kernels.paged_decode_attention(q, *pool, torch.tensor(tables), torch.tensor(lengths), BS, D ** -0.5)
    for i, (table, length) in enumerate(zip(tables, lengths)):
        assert torch.allclose(out[i], _reference(q[i], *pool, table, length), atol=1e-5)


def test_kernel_takes_strided_query_rows(pool):
    qk = torch.randn(3, H + KV, D)                   # the decoder slices q out of a fused q|k tensor
    tables, lengths = torch.tensor(_tables([5, 9, 2])), torch.tensor([5, 9, 2])
    strided = cpu_kernels.paged_decode_attention(qk[:, :H], *pool, tables, lengths, BS, D ** -0.5)
    dense = cpu_kernels.paged_decode_attention(qk[:, :H].contiguous(), *pool, tables, lengths, BS, D ** -0.5)
    assert torch.equal(strided, dense)


def _decode_context(lengths):
    ctx = AttentionContext(torch.zeros(0, dtype=torch.long), BS, num_decodes=len(lengths))
    ctx.decode_blocks, ctx.decode_lengths = torch.tensor(_tables(lengths)), torch.tensor(lengths)
    return ctx


def test_decode_attention_kernel_agrees_with_sdpa_path(pool, monkeypatch):
    ctx = _decode_context([7, 1, 12, 16])
    q = torch.randn(4, H, D)
    fast = attention._decode_attention(q, *pool, ctx)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert torch.allclose(fast, attention._decode_attention(q, *pool, ctx), atol=1e-5)


def test_short_cached_chunk_kernel_agrees_with_sdpa_path(pool, monkeypatch):
    cached, n = 9, 5                                  # a verify pass: 5 rows after 9 cached positions
    table = torch.tensor(_tables([cached + n])[0])
    chunk = PrefillChunk(0, n, table, torch.arange(cached + 1, cached + 1 + n))
    q, k, v = torch.randn(n, H, D), torch.randn(n, KV, D), torch.randn(n, KV, D)
    fast = attention._prefill_attention(q, k, v, *pool, chunk, BS)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert torch.allclose(fast, attention._prefill_attention(q, k, v, *pool, chunk, BS), atol=1e-5)


def test_kernel_rejects_length_beyond_table(pool):
    with pytest.raises(RuntimeError, match="outside its block table"):
        cpu_kernels.paged_decode_attention(torch.randn(1, H, D), *pool, torch.tensor([[0, 1]]),
                                           torch.tensor([2 * BS + 1]), BS, D ** -0.5)
