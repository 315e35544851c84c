"""The Triton paged-attention kernel matches the plain-torch reference: decode, prefill, chunked prefill and mixed
batches over a paged KV cache with GQA (on CPU via TRITON_INTERPRET=1, on the GPU when there is one)."""

import pytest
import torch

from sedac.plugins.reference import paged_attention_reference
from sedac.plugins.triton_attention import paged_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_batch(seqs, h, kv, d, block_size=16, dtype=torch.float32, shuffle=True, garbage=(), seed=0):
    """seqs: [(context_len, q_len)]. Slots no sequence owns hold NaN, so reading one poisons the output;
    block-table entries past each sequence's blocks hold `garbage` (cycled), or -1 by default."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(need) + 3  # spare blocks: never owned, all NaN
    order = torch.Generator().manual_seed(seed + 1)  # its own stream: shuffling leaves the K/V values as they are
    ids = torch.randperm(num_blocks, generator=order) if shuffle else torch.arange(num_blocks)
    width = max(need) + 2
    tables = torch.full((len(seqs), width), -1, dtype=torch.int32)
    k = torch.full((num_blocks * block_size, kv, d), float("nan"))
    v = torch.full((num_blocks * block_size, kv, d), float("nan"))
    used = 0
    for i, (ctx, _) in enumerate(seqs):
        tables[i, : need[i]] = ids[used : used + need[i]].to(torch.int32)
        for j, bad in zip(range(need[i], width), garbage * width):
            tables[i, j] = bad
        used += need[i]
        pos = torch.arange(ctx)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        k[slots] = torch.randn(ctx, kv, d, generator=gen)
        v[slots] = torch.randn(ctx, kv, d, generator=gen)
    q_lens = [q_len for _, q_len in seqs]
    q = torch.randn(sum(q_lens), h, d, generator=gen)
    starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    ctxs = torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32)
    args = [q.to(dtype), k.to(dtype), v.to(dtype), tables, starts, ctxs]
    return [a.to(DEVICE) for a in args] + [max(q_lens), block_size, d**-0.5]


def check(args, dtype=torch.float32):
    out = paged_attention(*args)
    ref = paged_attention_reference(*args)
    assert out.dtype == args[0].dtype and not out.isnan().any()
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    return out


@pytest.mark.parametrize("h,kv,d", [(9, 3, 64), (8, 2, 128), (4, 1, 80)])  # 80: BLOCK_D masks 48 lanes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_ragged_gqa(h, kv, d, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter's tl.dot on bf16 returns garbage (raw bits as numbers)")
    check(make_batch([(1, 1), (17, 1), (64, 1), (95, 1)], h, kv, d, dtype=dtype), dtype)


def test_reference_is_attention():
    # One sequence, no GQA, one block: the reference is softmax(q k^T * scale) v over the visible keys.
    q, k, v, tables, starts, ctxs, mq, bs, scale = make_batch([(10, 3)], 2, 2, 8, shuffle=False)
    out = paged_attention_reference(q, k, v, tables, starts, ctxs, mq, bs, scale)
    for i, n in enumerate((8, 9, 10)):
        p = (torch.einsum("hd,khd->hk", q[i], k[:n]) * scale).softmax(-1)
        assert torch.allclose(out[i], torch.einsum("hk,khd->hd", p, v[:n]), atol=1e-6)


@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_garbage_table_entries_and_shuffled_blocks(block_size):
    # Unused entries hold a huge id, -1 and an id of a NaN block: any read through them (or of the unowned
    # slots after a sequence's last key) turns the output into NaN. Same blocks, other order: same result.
    seqs = [(1, 1), (13, 1), (40, 5), (33, 1)]
    spare = -(-sum(c for c, _ in seqs) // block_size)  # unshuffled: ids >= sum of needs are spare (NaN)
    clean = make_batch(seqs, 4, 2, 64, block_size, shuffle=False, seed=1)
    dirty = make_batch(seqs, 4, 2, 64, block_size, shuffle=False, garbage=(10**6, -1, spare + 1), seed=1)
    shuffled = make_batch(seqs, 4, 2, 64, block_size, shuffle=True, garbage=(spare + 1,), seed=1)
    assert not torch.equal(clean[3], shuffled[3])
    base = check(clean)
    assert torch.equal(check(dirty), base)
    assert torch.allclose(check(shuffled), base, atol=1e-6)  # same keys, same order: only the slots differ


def test_prefill_without_prefix():
    check(make_batch([(37, 37)], 9, 3, 64, block_size=8))


@pytest.mark.parametrize("q_len", [5, 20])
def test_chunked_prefill_after_cached_prefix(q_len):
    check(make_batch([(40 + q_len, q_len)], 8, 2, 128, block_size=16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_batch(dtype):
    # Two decodes and a prefill chunk in one call: the grid spans the chunk, the decodes' extra programs exit.
    # 150 keys span more than one key tile at every tile size the host picks (64 or 128).
    check(make_batch([(30, 1), (150, 1), (52, 24)], 9, 3, 64, block_size=8, dtype=dtype), dtype)


def test_out_buffer_and_strided_q():
    h, kv, d = 8, 2, 64
    args = make_batch([(20, 1), (45, 12)], h, kv, d)
    q = args[0]
    qkv = torch.randn(q.shape[0], h + 2 * kv, d, device=DEVICE)
    qkv[:, :h] = q
    view = qkv[:, :h]  # a strided view, as sliced from a fused QKV projection
    assert not view.is_contiguous()
    expected = check(args)
    out = torch.full_like(q, float("nan"))
    assert paged_attention(view, *args[1:], out=out) is out
    assert torch.equal(out, expected)
