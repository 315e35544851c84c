"""Paged attention in Triton: one kernel for decode, prefill and chunked prefill over a paged KV cache.

Each program takes one sequence, one kv head and a tile of that sequence's query rows for all G query heads
sharing the kv head (GQA): rows = query tokens x G heads form the M dimension of tl.dot, so every K/V tile is
read once for the G heads. Keys are walked in tiles of BLOCK_N positions through the block table with an
online softmax in fp32 (flash attention), up to the last key the tile's queries can see.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: exact fp32 products (no TF32), so greedy decoding stays token-identical to an fp32 reference.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    bt_ptr,
    qs_ptr,
    ctx_ptr,
    sq_t,
    sq_h,
    sk_s,
    sk_h,
    sv_s,
    sv_h,
    so_t,
    so_h,
    sbt,
    scale_log2,
    D,
    G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    qblk = tl.program_id(2)
    q_begin = tl.load(qs_ptr + seq)
    q_len = tl.load(qs_ptr + seq + 1) - q_begin
    if qblk * BLOCK_Q >= q_len:  # the grid is sized by the longest query; shorter sequences stop here
        return
    ctx = tl.load(ctx_ptr + seq)

    # Row r = (query qi, head g): qi = r // G, g = r % G; rows past BLOCK_Q * G or q_len are padding.
    rows = tl.arange(0, BLOCK_M)
    qi = qblk * BLOCK_Q + rows // G
    head = kvh * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (qi < q_len)
    q_pos = ctx - q_len + qi  # absolute position: attends keys 0..q_pos
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    tok = (q_begin + qi).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    # Keys this tile needs: up to the position of its last real query row (never past ctx, so unused
    # block-table entries are never looked up).
    kv_end = ctx - q_len + tl.minimum((qblk + 1) * BLOCK_Q, q_len)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a fully masked row gives p = 0, not NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        blk = tl.load(bt_ptr + seq * sbt + n // BLOCK_SIZE, mask=n_ok, other=0)
        slot = blk.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE  # [BLOCK_N]
        kt = tl.load(
            k_ptr + slot[None, :] * sk_s + kvh * sk_h + d[:, None],
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        ).to(q.dtype)  # [BLOCK_D, BLOCK_N], cast in registers (the cache may be stored in another dtype)
        s = _dot(q, kt, IEEE) * scale_log2  # [BLOCK_M, BLOCK_N], log2 domain for exp2
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + slot[:, None] * sv_s + kvh * sv_h + d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(q.dtype)  # [BLOCK_N, BLOCK_D]; masked lanes are 0, so garbage never meets p = 0 as NaN
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    o = acc / l_i[:, None]  # every real row sees key 0, so l_i > 0 there
    tl.store(
        out_ptr + tok[:, None] * so_t + head[:, None] * so_h + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def paged_attention(
    q: torch.Tensor,  # [T, H, D], last dim contiguous
    k_cache: torch.Tensor,  # [num_slots, KV, D], slot = block_id * block_size + offset
    v_cache: torch.Tensor,  # [num_slots, KV, D]
    block_tables: torch.Tensor,  # [S, W] int32 or int64 (the runner's)
    query_starts: torch.Tensor,  # [S + 1] int32 or int64, contiguous
    context_lens: torch.Tensor,  # [S] int32 or int64, contiguous, including each sequence's new tokens
    max_query_len: int,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D], q's dtype
) -> torch.Tensor:
    t, h, d = q.shape
    kv = k_cache.shape[1]
    g = h // kv
    assert h == kv * g and k_cache.shape[2] == d and v_cache.shape == k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    s = context_lens.shape[0]
    if t == 0 or s == 0:
        return out
    # Rows = query tokens x G heads: decode fills G rows (padded to 16, tl.dot's minimum); prefill chunks
    # take up to 64 rows so each K/V tile serves many queries (128 measured slower on an H200). fp32 IEEE
    # dots run on FMA units and spill past 16 rows. 128-key tiles pay where D is small, or for few rows
    # while programs are few (small batches leave SMs idle); else 64 measured faster at D = 128.
    half = q.dtype != torch.float32
    block_m = max(16, triton.next_power_of_2(g), min(64 if half else 16, triton.next_power_of_2(max_query_len * g)))
    block_q = block_m // g
    block_n = 128 if half and (d <= 64 or (block_m < 64 and s * kv <= 256)) else 64
    grid = (s, kv, triton.cdiv(max_query_len, block_q))
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_starts,
        context_lens,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        scale * 1.4426950408889634,  # log2(e): softmax via exp2
        d,
        G=g,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d),
        IEEE=not half,
        num_warps=4,
        num_stages=3 if half else 2,  # fp32 K/V tiles take twice the shared memory
    )
    return out
