"""Llama-family and Qwen2 decoder, run layer by layer so SEDAC can exit tokens between layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sedac.config import ModelConfig
from sedac.models.attention import paged_attention
from sedac.models.layers import Linear, RMSNorm, RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.k_cache = self.v_cache = torch.empty(0)  # [num_slots, KV, D], set by the runner

    def forward(self, h: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        """h [T, hidden] -> [T, hidden]."""
        t = h.shape[0]
        q, k, v = self.qkv_proj(self.input_norm(h)).split(self.split, dim=-1)
        q, k = rotary(positions, q.view(t, self.num_heads, self.head_dim),
                      k.view(t, self.num_kv_heads, self.head_dim))
        v = v.view(t, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, self.k_cache, self.v_cache)
        h = h + self.o_proj(attn.reshape(t, -1))
        gate, up = self.gate_up_proj(self.post_norm(h)).chunk(2, dim=-1)
        return h + self.down_proj(F.silu(gate) * up)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, max_positions, cfg.rope_scaling)
        # lm_head [hidden, vocab]; tied models share the embedding's storage (transposed view).
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, start: int = 0, end: int | None = None):
        for layer in self.layers[start:end]:
            h = layer(h, positions, self.rotary)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed logits for the rows of h (only the rows that sample)."""
        h = self.norm(h)
        if self.lm_head is None:
            return h @ self.embed_tokens.weight.t()
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden states [T, hidden] after the last layer."""
        return self.run_layers(self.embed(input_ids), positions)
