"""Llama-family and Qwen2 decoder, run layer by layer so SEDAC can exit tokens between layers."""

from __future__ import annotations

import torch
from torch import nn

from sedac.config import ModelConfig
from sedac.models import cpu_kernels
from sedac.models.attention import cached_attention, get_context, paged_attention
from sedac.models.greedy_head import MAX_SCREEN_ROWS, GreedyScreen
from sedac.models.layers import (
    DRAFT_PRECISIONS,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    fused_kernels,
    rotary_fits,
    silu_and_mul,
)
from sedac.models.quant import BlockWeight


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
        self._kernel_args: dict[bool, tuple] = {}  # draft -> DecodeStack's weight arguments, once packed
        self._decode_stacks: dict[tuple, object] = {}  # (layers from here, draft) -> their C++ DecodeStack

    def kv_projection(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (already normed) -> this layer's K and V before rotary, [T, 2 * KV * D]."""
        return self.qkv_proj(x)[:, self.split[0] :]

    def write_kv(self, kv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, slots: torch.Tensor) -> None:
        """Store K/V [T, 2 * KV * D] (before rotary) of tokens that exited before this layer, predicted
        from their exit state, so later tokens can attend to them."""
        kv = kv.view(kv.shape[0], 2 * self.num_kv_heads, self.head_dim)
        self.k_cache.index_copy_(
            0, slots, apply_rotary(kv[:, : self.num_kv_heads], cos, signed_sin).to(self.k_cache.dtype)
        )
        self.v_cache.index_copy_(0, slots, kv[:, self.num_kv_heads :].to(self.v_cache.dtype))

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, draft: bool = False
    ) -> torch.Tensor:
        """h [T, hidden], rotary tables [T, 1, D] -> [T, hidden]; draft: on the draft copies (a draft
        pass). DecoderModel.run_layers takes fused_decode instead on CPU decode steps."""
        t = h.shape[0]
        attn = self._attention(_project(self.qkv_proj, self.input_norm(h), draft), cos, signed_sin)
        h, normed = self.post_norm.add_and_norm(h, _project(self.o_proj, attn.reshape(t, -1), draft))
        return h + _project(self.down_proj, silu_and_mul(_project(self.gate_up_proj, normed, draft)), draft)

    def _attention(self, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """qkv [T, (H + 2 KV) * D] before rotary -> attention output [T, H, D]; this step's K/V enter the cache."""
        t, heads, ctx = qkv.shape[0], self.num_heads, get_context()
        if ctx.varlen is not None and (fused := fused_kernels(qkv)) and rotary_fits(self.head_dim):
            q = fused.rotary_and_cache(qkv, cos, signed_sin, ctx.slot_mapping, self.k_cache, self.v_cache, heads)
            return cached_attention(q, self.k_cache, self.v_cache)  # CUDA: rotary and the cache write, one kernel
        q_and_k = qkv[:, : self.split[0] + self.split[1]].view(t, heads + self.num_kv_heads, self.head_dim)
        q_and_k = apply_rotary(q_and_k, cos, signed_sin)  # one pass for q and k
        v = qkv[:, -self.split[2] :].view(t, self.num_kv_heads, self.head_dim)
        return paged_attention(q_and_k[:, :heads], q_and_k[:, heads:], v, self.k_cache, self.v_cache)

    def _fusable(self, h: torch.Tensor, ctx, draft: bool) -> bool:
        cpu_decode = not ctx.prefills and ctx.varlen is None
        return cpu_decode and self.qkv_proj.kernel_weights(draft) is not None and cpu_kernels.usable(h)

    def forget_kernel_args(self) -> None:
        """The gathered arguments are stale once the draft copies change."""
        self._kernel_args.clear()
        self._decode_stacks.clear()

    def decode_stack(self, layers: list["DecoderLayer"], draft: bool):
        """The C++ DecodeStack of the range `layers` that starts at this layer (base or draft copies): their
        weights gathered once, so a step passes only its own tensors."""
        key = (len(layers), draft)
        if key not in self._decode_stacks:
            panels, scales, mins = [], [], []
            for layer in layers:
                layer_panels, layer_scales, layer_mins, out_features = layer.kernel_args(draft)
                panels += layer_panels
                scales += layer_scales
                mins += layer_mins
            self._decode_stacks[key] = torch.classes.sedac_cpu.DecodeStack(
                [layer.input_norm.weight for layer in layers], [layer.post_norm.weight for layer in layers],
                self.input_norm.eps, panels, scales, mins, out_features, [layer.qkv_proj.bias for layer in layers],
                self.num_heads, self.qkv_proj.kernel_levels(draft),
            )  # fmt: skip
        return self._decode_stacks[key]

    def kernel_args(self, draft: bool) -> tuple:
        """(panels, scales, mins, out_features) of the four projections (base or draft copies) as
        DecodeStack takes them, gathered once."""
        if draft not in self._kernel_args:
            projections = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
            panels, scales, mins = zip(*(p.kernel_weights(draft) for p in projections))
            self._kernel_args[draft] = (list(panels), list(scales), list(mins), [p.out_features for p in projections])
        return self._kernel_args[draft]


def fused_decode(layers: list[DecoderLayer], h, cos, signed_sin, ctx, draft: bool = False) -> torch.Tensor:
    """Consecutive layers as one C++ call, bit-identical to their forward: a CPU decode step on the
    packed weights (fp32, fp16, bf16, int8 or blocks), or on the draft copies."""
    return layers[0].decode_stack(layers, draft).run(
        h, cos, signed_sin, [layer.k_cache for layer in layers], [layer.v_cache for layer in layers],
        ctx.slot_mapping, ctx.decode_blocks, ctx.decode_lengths, ctx.block_size,
    )  # fmt: skip


def _project(linear: Linear, x: torch.Tensor, draft: bool) -> torch.Tensor:
    return linear.draft(x) if draft else linear(x)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.layer_list = list(self.layers)  # slicing a list is ~50 us a step cheaper than indexing ModuleList
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, max_positions, cfg.rope_scaling)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)  # [hidden, vocab]
        self.greedy_screen: GreedyScreen | None = None
        self.embed_blocks: BlockWeight | None = None  # a block-quantized table (gguf engines)

    def tie_lm_head(self) -> None:
        """Tied models keep one copy on disk; in memory the head is a contiguous [hidden, vocab]
        transpose of the embedding, a GEMV layout measured ~1.7x faster on CPU than x @ E.T. A
        block-quantized table is the head's weight as it is, and the embedding reads the head's rows."""
        if self.embed_blocks is not None:
            self.lm_head.load_blocks(self.embed_blocks)
            self.embed_blocks = None
            return
        self.lm_head.weight = nn.Parameter(self.embed_tokens.weight.t().contiguous(), requires_grad=False)

    def load_embedding_blocks(self, blocks: BlockWeight) -> None:
        self.embed_tokens.weight = None
        self.embed_blocks = blocks

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, hidden] in the compute dtype (the table may be kept at a lower precision, or
        block-quantized: its rows dequantized as they are looked up)."""
        if self.embed_tokens.weight is None:
            blocks = self.embed_blocks if self.embed_blocks is not None else self.lm_head.blocks
            return blocks.dense(input_ids).to(self.norm.weight.dtype)
        return self.embed_tokens(input_ids).to(self.norm.weight.dtype)

    def make_draft_copies(self, precision: str, int8_activations: bool = False) -> None:
        """Copies of every projection at `precision` (DRAFT_PRECISIONS, cheaper than the base) and of the LM
        head at int8: SEDAC's drafter and precision exit. Replaces any earlier copies. The head stays 8-bit
        as in llama.cpp's 4-bit files and TensorRT-LLM's int4 AWQ: on SmolLM2 int4 layers drafted 0.986 of
        the full model's greedy tokens with an int8 head, 0.875 with an int4 one (int8 layers: 0.962)."""
        if precision not in DRAFT_PRECISIONS:
            raise ValueError(f"draft precision must be one of {', '.join(DRAFT_PRECISIONS)}, got {precision!r}")
        if precision == "int8" and self.int8_weights:
            raise ValueError("an int8 engine's draft copy must be cheaper than its weights: int4")
        for linear in self.layers.modules():
            if isinstance(linear, Linear):
                linear.make_draft_copy(precision, int8_activations)
        self.lm_head.make_draft_copy("int8")
        for layer in self.layers:
            layer.forget_kernel_args()

    def screen_greedy_head(self, int8_activations: bool = False) -> None:
        """Greedy steps of up to MAX_SCREEN_ROWS rows take the exact int8-screened head (greedy_head.py),
        its int8 copy on int8 activations where the CPU has VNNI (the VNNI head 0.50 vs 0.87 ms on SmolLM2);
        a block-quantized head (gguf) is already no more bytes than the screen's int8 copy."""
        if self.lm_head.blocks is not None:
            return
        if self.lm_head.int8 is None or int8_activations != (self.lm_head.int8[0].dtype == torch.uint8):
            self.lm_head.quantize_int8(int8_activations)  # the draft head (an int8 copy) is the screen's
        self.greedy_screen = GreedyScreen(self.lm_head)

    @property
    def int8_weights(self) -> bool:
        """An int8 engine: every projection is weight-only int8, so each layer pass is an int8 pass."""
        return self.layers[0].qkv_proj.weight_only_int8

    def run_layers(
        self, h: torch.Tensor, positions: torch.Tensor, start: int = 0, end: int | None = None, draft: bool = False
    ):
        cos, signed_sin = self.rotary.tables(positions, h.dtype)
        layers = self.layer_list[start:end]
        ctx = get_context()
        if layers and layers[0]._fusable(h, ctx, draft):  # decided once per step: ~1 ms/token less Python at batch 1
            return fused_decode(layers, h, cos, signed_sin, ctx, draft)
        for layer in layers:
            h = layer(h, cos, signed_sin, draft)
        return h

    def logits(self, h: torch.Tensor, draft: bool = False, argmax_only: bool = False) -> torch.Tensor:
        """Final-normed logits for the rows of h (only the rows that sample). argmax_only: the caller
        takes only each row's argmax, so rows outside the argmax's candidates may come back -inf."""
        if argmax_only and not draft and self.greedy_screen is not None and len(h) <= MAX_SCREEN_ROWS:
            return self.greedy_screen.logits(self.norm(h))
        return _project(self.lm_head, self.norm(h), draft)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden states [T, hidden] after the last layer."""
        return self.run_layers(self.embed(input_ids), positions)
