"""Reference implementations of the SEDAC ops and the paged attention in plain torch (the spec the kernels are
tested against)."""

from __future__ import annotations

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> Shannon entropy (nats) of softmax(logits) per row, fp32 [N]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> p1 - p2 per row, fp32 [N]: how far softmax's top token leads the runner-up
    (0 at a tie). The precision exit's confidence: quantization noise flips near-ties, not flat rows."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def exit_decision(logits: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A token exits when its exit-head entropy is at or below its threshold: -> (entropy [N], exit [N] bool)."""
    h = entropy(logits)
    return h, h <= thresholds.float()


def kv_predict(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Ghost KV: deeper layers' K/V for exited tokens from their exit hidden state.
    hidden [N, H], weight [H, O], bias [O] -> [N, O] (O = skipped layers x 2 x kv_heads x head_dim)."""
    return torch.addmm(bias, hidden, weight)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Weight-only int8 linear (lossless mode's drafter): x [N, K], weight int8 [O, K], per-row scale
    [O], bias [O] or None -> (x @ weight.T) * scale + bias [N, O], accumulated in fp32, in x's dtype."""
    y = (x.float() @ weight.float().t()) * scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[out, in / 2] uint8 (input 2k in the low nibble, 2k + 1 in the high) -> codes [out, in] uint8."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
    """Block weights by rows, codes unpacked [out, in] -> fp32 [out, in]: q * scale (+ minimum) per group of
    inputs (the product of a code and an fp16 scale is exact in fp32, so this rounds once, like an fma)."""
    group = codes.shape[1] // scale.shape[1]
    w = codes.float() * scale.float().repeat_interleave(group, dim=1)
    return w if minimum is None else w + minimum.float().repeat_interleave(group, dim=1)


def block_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [N, K] against block weights by rows: 4-bit codes packed [O, K / 2] uint8 with minimums, or 8-bit
    codes [O, K] int8 without (sedac.models.quant.BlockWeight)."""
    w = dequantize_blocks(unpack_nibbles(codes) if codes.dtype == torch.uint8 else codes, scale, minimum)
    out = x.float() @ w.t()
    return (out if bias is None else out + bias.float()).to(x.dtype)


def paged_attention_reference(
    q, k_cache, v_cache, block_tables, query_starts, context_lens, max_query_len, block_size, scale
) -> torch.Tensor:
    """Plain torch, one sequence at a time: gather keys through the block table, causal softmax in fp32."""
    g = q.shape[1] // k_cache.shape[1]
    out = torch.empty_like(q)
    starts, ctxs = query_starts.tolist(), context_lens.tolist()
    for i, ctx in enumerate(ctxs):
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[i, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].float().repeat_interleave(g, dim=1)  # [ctx, H, D]
        v = v_cache[slots].float().repeat_interleave(g, dim=1)
        qs = q[starts[i] : starts[i + 1]].float()  # [q_len, H, D]
        q_pos = ctx - qs.shape[0] + torch.arange(qs.shape[0], device=q.device)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[starts[i] : starts[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
