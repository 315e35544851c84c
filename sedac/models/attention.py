"""Paged attention over a flat slot-indexed KV cache: the C++ kernel and SDPA on CPU, one Triton kernel on CUDA.

The runner builds one AttentionContext per step (nano-vllm style) instead of threading metadata
through every layer. A step's tokens are laid out decodes first (one token each), then prefill
chunks (a run of a sequence's tokens, possibly after cached context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sedac.models import cpu_kernels


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the step's token batch
    end: int  # one past the last row
    blocks: torch.Tensor  # [num_blocks] the sequence's block table
    context_lengths: torch.Tensor | None = None  # [q_len] positions each row attends (cached + i + 1);
    # None when there is no cached context
    cached: int = 0  # the sequence's positions before the chunk
    _mask: torch.Tensor | None = None

    def mask(self, block_size: int) -> torch.Tensor:
        """[q_len, num_blocks * block_size] bool, causal after the cache; built once per step."""
        if self._mask is None:
            slots = torch.arange(len(self.blocks) * block_size, device=self.blocks.device)
            self._mask = slots[None, :] < self.context_lengths[:, None]
        return self._mask


@dataclass
class VarlenBatch:
    query_starts: torch.Tensor  # [S + 1] sequence s's rows are query_starts[s]:query_starts[s + 1]
    context_lens: torch.Tensor  # [S] keys of each sequence, its new rows included
    block_tables: torch.Tensor  # [S, W] block ids in position order (unused entries never read)
    max_query_len: int  # the longest sequence's rows (sizes the kernel's grid; known on the host)


@dataclass
class AttentionContext:
    slot_mapping: torch.Tensor  # [T] slot each new token's K/V is written to
    block_size: int
    num_decodes: int = 0
    decode_blocks: torch.Tensor | None = None  # [B, nb] block tables of the decodes (padded)
    decode_lengths: torch.Tensor | None = None  # [B] context length of each decode (its position + 1)
    prefills: list[PrefillChunk] = field(default_factory=list)
    _decode_mask: torch.Tensor | None = None
    # The Triton kernel's view of the same step (CUDA): every sequence's rows as one varlen batch.
    varlen: VarlenBatch | None = None

    def decode_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, 1, nb * block_size]: 0 on context slots, -inf on padding; built once per step.
        Additive, not boolean: CPU SDPA measured ~25% faster on decode batches with a float mask."""
        if self._decode_mask is None:
            width = self.decode_blocks.shape[1] * self.block_size
            padding = torch.arange(width, device=self.decode_lengths.device)[None, :] >= self.decode_lengths[:, None]
            mask = torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill_(padding, float("-inf"))
            self._decode_mask = mask[:, None, None, :]
        return self._decode_mask


_CONTEXT: AttentionContext | None = None


def set_context(ctx: AttentionContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> AttentionContext:
    assert _CONTEXT is not None, "attention called outside a runner step"
    return _CONTEXT


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KV, D], caches [num_slots, KV, D] -> [T, H, D]."""
    ctx = get_context()
    k_cache.index_copy_(0, ctx.slot_mapping, k.to(k_cache.dtype))  # a half pool (kv_cache_dtype) rounds here
    v_cache.index_copy_(0, ctx.slot_mapping, v.to(v_cache.dtype))
    if ctx.varlen is not None:
        return cached_attention(q, k_cache, v_cache)
    nd = ctx.num_decodes
    if not ctx.prefills:  # a pure decode step: no output buffer to assemble
        return _decode_attention(q, k_cache, v_cache, ctx)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, ctx)
    for chunk in ctx.prefills:
        out[chunk.start : chunk.end] = _prefill_attention(q, k, v, k_cache, v_cache, chunk, ctx.block_size)
    return out


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """q [T, H, D] over a varlen context whose K/V, this step's included, are in the caches (the Triton kernel)."""
    from sedac.plugins import triton_attention  # triton is optional: only varlen contexts need it

    ctx = get_context()
    b = ctx.varlen
    return triton_attention.paged_attention(
        q, k_cache, v_cache, b.block_tables, b.query_starts, b.context_lens, b.max_query_len, ctx.block_size,
        q.shape[-1] ** -0.5,
    )  # fmt: skip


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """cache [slots, KV, D], blocks [..., nb] -> [..., nb * block_size, KV, D] in position order.
    Whole blocks are copied (index_select on block ids), far faster on CPU than gathering slots."""
    paged = cache.view(-1, block_size, *cache.shape[1:])
    out = paged.index_select(0, blocks.reshape(-1))
    return out.view(*blocks.shape[:-1], blocks.shape[-1] * block_size, *cache.shape[1:])


def _decode_attention(q, k_cache, v_cache, ctx):
    b, h, d = q.shape
    if cpu_kernels.usable(q):
        return torch.ops.sedac_cpu.paged_decode_attention(
            q, k_cache, v_cache, ctx.decode_blocks, ctx.decode_lengths, ctx.block_size, d**-0.5
        )
    # Grouped-query trick: a decode has one query per head, so the G query heads that share a KV
    # head become G "query positions" of that KV head; no KV expansion, no copy of q.
    kv = k_cache.shape[1]
    keys = gather_blocks(k_cache, ctx.decode_blocks, ctx.block_size).transpose(1, 2).to(q.dtype)  # [B, KV, L, D]
    values = gather_blocks(v_cache, ctx.decode_blocks, ctx.block_size).transpose(1, 2).to(q.dtype)
    o = F.scaled_dot_product_attention(q.reshape(b, kv, h // kv, d), keys, values, attn_mask=ctx.decode_mask(q.dtype))
    return o.reshape(b, h, d)


# Short chunks after a cached context (a prompt's tail after a prefix-cache hit) run as decode rows
# in the CPU kernel, each row attending to its own causal length; longer chunks take the causal prefill
# kernel (csrc/prefill_attention.cpp) where the library has AVX-512, else SDPA's blocked GEMMs.
KERNEL_MAX_CHUNK = 16


def _prefill_kernel_fits(q: torch.Tensor) -> bool:
    head_dim = q.shape[-1]
    return head_dim % 16 == 0 and head_dim <= 256 and cpu_kernels.usable(q) and cpu_kernels.causal_prefill()


def _prefill_attention(q, k, v, k_cache, v_cache, chunk, block_size):
    n = chunk.end - chunk.start
    short_after_cache = chunk.context_lengths is not None and n <= KERNEL_MAX_CHUNK
    if not short_after_cache and len(chunk.blocks) and _prefill_kernel_fits(q):
        return torch.ops.sedac_cpu.prefill_attention(
            q[chunk.start : chunk.end], k_cache, v_cache, chunk.blocks, chunk.cached, block_size, q.shape[-1] ** -0.5
        )
    if short_after_cache and cpu_kernels.usable(q):
        tables = chunk.blocks.expand(n, -1).contiguous()
        return torch.ops.sedac_cpu.paged_decode_attention(
            q[chunk.start : chunk.end], k_cache, v_cache, tables, chunk.context_lengths, block_size, q.shape[-1] ** -0.5
        )
    # 4-D [1, heads, T, D] as HF passes them: 3-D inputs took SDPA's math kernel on CPU (a full T x T
    # score matrix; 59 vs 14 ms per layer for a 1,024-token SmolLM2 prompt).
    qc = q[chunk.start : chunk.end].transpose(0, 1)[None]  # [1, H, Tq, D]
    if chunk.context_lengths is None:  # no cached prefix: attend to the chunk itself
        keys = k[chunk.start : chunk.end].transpose(0, 1)[None]
        values = v[chunk.start : chunk.end].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qc, keys, values, is_causal=True, enable_gqa=True)
    else:
        keys = gather_blocks(k_cache, chunk.blocks, block_size).transpose(0, 1)[None].to(q.dtype)  # [1, KV, L, D]
        values = gather_blocks(v_cache, chunk.blocks, block_size).transpose(0, 1)[None].to(q.dtype)
        o = F.scaled_dot_product_attention(qc, keys, values, attn_mask=chunk.mask(block_size), enable_gqa=True)
    return o[0].transpose(0, 1)
