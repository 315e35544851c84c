"""Building blocks with HF-identical arithmetic order (parity at fp32 depends on it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sedac.models import cpu_kernels
from sedac.models.quant import (
    INT8_ACTIVATION_GROUP,
    BlockWeight,
    from_int8_a8_panels,
    from_panels,
    int8_a8_panels,
    quantize_int4,
    quantize_rows,
    to_panels,
)
from sedac.plugins import ops  # registers torch.ops.sedac; HAS_TRITON

DRAFT_PRECISIONS = ("int8", "int4")  # SEDAC's draft copies, cheapest last
DRAFT_GROUP_SIZE = 32  # an int4 draft copy's inputs per scale and minimum (GGUF Q4_1's block)


class Linear(nn.Module):
    """Weight stored [in, out]: x @ W is a faster GEMV than F.linear's x @ W.T on CPU (measured).

    On CPU the runner packs the weight into panels for the panel kernels (`pack_for_cpu`,
    csrc/panel_linear.cpp, csrc/block_linear.cpp): measured on 2 AVX2 cores, faster than oneDNN's
    prepacked weights at every row count and ~1.6x at batch 1; each output row is computed the same
    whatever the batch. Weight-only engines hold `int8` (int8 engines) or `blocks` (int4, gguf) instead.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None
        # (weight int8, row scales [out]): the weight [out, in], or int8 panels like `packed` when packed
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.blocks: BlockWeight | None = None  # block-quantized weight (int4 and gguf engines)
        self.draft_blocks: BlockWeight | None = None  # an int4 draft copy (make_draft_copy), else drafts use int8
        self.activation_levels = 2  # the integer kernels' int8 levels per activation group (1: w8a8, w4a8)

    def pack_for_cpu(self, int8_activations: bool = False, activation_levels: int = 2) -> None:
        """Panels [ceil(out / 16), in, 16] (zero-padded): panel p holds outputs 16p..16p+15 by input,
        at the weight's own precision (fp32, fp16, bf16; int8 with its scales; blocks with theirs). With
        int8_activations, 4-bit blocks and int8 weights take the layouts of the integer kernels
        (BlockWeight.panels, int8_a8_panels), whose activations take activation_levels int8 levels."""
        self.activation_levels = activation_levels
        if self.blocks is not None:
            self.blocks = self.blocks.panels(int8_activations, activation_levels)
        elif self.weight_only_int8:
            weight, scale = self.int8
            self.int8 = (_int8_panels(weight, int8_activations), scale)
        else:
            self.packed = to_panels(self.weight.t())
            self.weight = None  # the packed copy replaces it: one copy of the weights in memory

    def quantize_int8(self, int8_activations: bool = False) -> None:
        """Keep a weight-only int8 copy, one scale per output row (a quarter of fp32's bytes to stream): an
        int8 draft copy, or the greedy screen's head; when packed, on int8 activations (the VNNI kernel's
        layout) with int8_activations, else on full-precision ones."""
        weight, scale = quantize_rows(self.dense_rows())
        self.int8 = (weight if self.packed is None else _int8_panels(weight, int8_activations), scale)

    def make_draft_copy(self, precision: str, int8_activations: bool = False) -> None:
        """SEDAC's draft copy of this layer at `precision` (DRAFT_PRECISIONS): int8 rows (an int8 layer is
        its own), or int4 blocks (packed like the base when it is, taking int8 activations where the base
        kernels do)."""
        self.draft_blocks = None
        if precision == "int8":
            if not self.weight_only_int8:
                self.quantize_int8()
            return
        blocks = quantize_int4(self.dense_rows(), DRAFT_GROUP_SIZE)
        self.draft_blocks = blocks.panels(int8_activations) if self._on_panels else blocks

    def load_int8(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """Make the layer weight-only int8 (an int8 engine): weight [out, in] int8, scale [out]."""
        self.weight = None
        self.int8 = (weight, scale)

    def load_blocks(self, blocks: BlockWeight) -> None:
        """Make the layer block-quantized (an int4 or gguf engine)."""
        self.weight = None
        self.blocks = blocks

    def dequantize_blocks(self, dtype: torch.dtype) -> None:
        """Back to a dense weight (devices without a block kernel)."""
        self.weight = nn.Parameter(self.blocks.dense().t().to(dtype).contiguous(), requires_grad=False)
        self.blocks = None

    @property
    def _on_panels(self) -> bool:
        """The base weights are packed for the CPU kernels."""
        if self.blocks is not None:
            return self.blocks.packed
        return self.packed is not None or (self.int8 is not None and self.int8[0].dim() == 3)

    @property
    def weight_only_int8(self) -> bool:
        return self.weight is None and self.packed is None and self.blocks is None

    def dense_rows(self) -> torch.Tensor:
        """The weight as [out, in] (a copy when packed or quantized)."""
        if self.blocks is not None:
            return self.blocks.dense()
        if self.weight_only_int8:
            return self.int8_rows()
        return self.weight.t() if self.packed is None else from_panels(self.packed, self.out_features)

    def output_rows(self, outputs: torch.Tensor) -> torch.Tensor:
        """The weight rows [len(outputs), in] of the given output indices, read in place."""
        if self.packed is None:
            return self.weight[:, outputs].t()
        return self.packed[outputs // 16, :, outputs % 16]

    def int8_rows(self) -> torch.Tensor:
        """The int8 copy dequantized, [out, in] fp32."""
        weight, scale = self.int8
        if weight.dtype == torch.uint8:  # int8_a8_panels
            weight = from_int8_a8_panels(weight, self.out_features)
        elif weight.dim() == 3:
            weight = from_panels(weight, self.out_features)
        return weight.float() * scale[:, None]

    def kernel_weights(self, draft: bool) -> tuple | None:
        """(panels, scale or None, minimum or None) of the base weights or, with draft, the draft copy,
        as the fused CPU decode layer takes them, once packed."""
        blocks = self.draft_blocks if draft else self.blocks
        if blocks is not None:
            return (blocks.codes, blocks.scale, blocks.minimum) if blocks.packed else None
        if draft or self.weight_only_int8:
            return (*self.int8, None) if self.int8 is not None and self.int8[0].dim() == 3 else None
        return None if self.packed is None else (self.packed, None, None)

    def kernel_levels(self, draft: bool) -> int:
        """The int8 levels per activation group that kernel_weights(draft)'s integer kernel takes."""
        blocks = self.draft_blocks if draft else self.blocks
        return self.activation_levels if blocks is None else blocks.activation_levels

    def draft(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on its draft copy (make_draft_copy)."""
        if self.draft_blocks is not None:
            return self.draft_blocks.linear(x, self.bias)
        return self.int8_linear(x)

    def int8_linear(self, x: torch.Tensor, activation_levels: int | None = None) -> torch.Tensor:
        """The layer on its int8 weights (an int8 engine's, or a copy): the C++ kernel on CPU, else the sedac
        op; on int8 activations at the layer's levels unless activation_levels says otherwise."""
        weight, scale = self.int8
        if weight.dtype == torch.uint8:
            levels = activation_levels or self.activation_levels
            return torch.ops.sedac_cpu.int8_linear_a8(x, weight, scale, self.bias, self.out_features, levels)
        if weight.dim() == 3:
            return torch.ops.sedac_cpu.int8_panel_linear(x, weight, scale, self.bias, self.out_features)
        return torch.ops.sedac.int8_linear(x, weight, scale, self.bias)  # Triton on CUDA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.sedac_cpu.panel_linear(x, self.packed, self.bias, self.out_features)
        if self.blocks is not None:
            return self.blocks.linear(x, self.bias)
        if self.weight_only_int8:
            return self.int8_linear(x)
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)


def _int8_panels(weight: torch.Tensor, int8_activations: bool) -> torch.Tensor:
    """int8 rows [out, in] as panels: int8_linear_a8's layout where activations go int8 (and the inputs
    fill its groups), else int8_panel_linear's."""
    if int8_activations and weight.shape[1] % INT8_ACTIVATION_GROUP == 0:
        return int8_a8_panels(weight)
    return to_panels(weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and cpu_kernels.usable(x):
            return torch.ops.sedac_cpu.rms_norm(x, self.weight, self.eps)
        if x.dim() == 2 and (fused := fused_kernels(x)):
            return fused.rms_norm(x, self.weight, self.eps)
        # fp32: one F.rms_norm call (bit-identical to HF's order here, fewer dispatches);
        # other dtypes: HF's order, normalize in fp32, cast back, then scale.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_and_norm(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual add then norm: (h + delta, norm(h + delta)), fused on CPU."""
        if h.dim() == 2 and cpu_kernels.usable(h):
            return torch.ops.sedac_cpu.add_rms_norm(h, delta, self.weight, self.eps)
        if h.dim() == 2 and (fused := fused_kernels(h)):
            return fused.rms_norm(h, self.weight, self.eps, delta)
        h = h + delta
        return h, self(h)


def rotary_fits(head_dim: int) -> bool:
    """The fused rotary kernels walk each half of a head as one power-of-two block."""
    half = head_dim // 2
    return half & (half - 1) == 0


def fused_kernels(x: torch.Tensor):
    """sedac.plugins.triton_fused for CUDA tensors outside autograd (the kernels have no backward), if triton
    is installed; else None (the PyTorch ops)."""
    if not (x.is_cuda and ops.HAS_TRITON) or torch.is_grad_enabled():
        return None
    from sedac.plugins import triton_fused

    return triton_fused


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> silu(gate) * up [T, I], fused on CPU."""
    if cpu_kernels.usable(gate_up):
        return torch.ops.sedac_cpu.silu_and_mul(gate_up)
    if fused := fused_kernels(gate_up):
        return fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None, max_pos: int):
    """Inverse frequencies and attention scaling; scaled variants come from transformers itself."""
    if not rope_scaling or rope_scaling.get("rope_type", "default") == "default":
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta**exponent), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": theta, **rope_scaling}
    cfg = LlamaConfig(
        head_dim=head_dim,
        hidden_size=head_dim,
        num_attention_heads=1,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")


class RotaryEmbedding(nn.Module):
    """Rotary tables looked up once per step and applied to q and k in one pass (fewer small ops)."""

    def __init__(self, head_dim: int, theta: float, max_pos: int, rope_scaling: dict | None):
        super().__init__()
        inv_freq, scale = rope_inv_freq(head_dim, theta, rope_scaling, max_pos)
        freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * scale
        half = head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * signed_sin, exactly (a sign flip is exact in IEEE).
        self.register_buffer("cos", emb.cos() * scale, persistent=False)  # [max_pos, D]
        self.register_buffer("signed_sin", torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [T] -> cos, signed_sin [T, 1, D] for this step."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; HF's q * cos + rotate_half(q) * sin in four ops (one fused op on CPU)."""
    if cpu_kernels.usable(x):
        return torch.ops.sedac_cpu.rotary(x, cos, signed_sin)
    if rotary_fits(x.shape[-1]) and (fused := fused_kernels(x)):
        return fused.rotary(x, cos, signed_sin)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
