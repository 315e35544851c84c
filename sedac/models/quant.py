"""Weight-only quantized formats: int8 rows (one scale per output) and blocks (a scale, and for 4-bit
codes a minimum, per group of inputs: int4 engines and GGUF's Q4_0, Q4_1 and Q8_0 blocks).

A block weight is stored by rows ([out, ...], what engines keep on disk) and packed into panels for
the CPU kernel (csrc/block_linear.cpp); `dense` is the reference both must match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sedac.config import MIN_SUFFIX, SCALE_SUFFIX
from sedac.models import cpu_kernels
from sedac.plugins import ops  # noqa: F401  (registers torch.ops.sedac.block_linear)
from sedac.plugins.reference import dequantize_blocks, unpack_nibbles

PANEL = 16  # outputs per panel (csrc/panel_schedule.h)
INT8_ACTIVATION_GROUP = 32  # csrc/int8_linear_a8.cpp quantizes activations per 32 inputs (8-bit blocks: their group)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per row (TensorRT-LLM's weight-only int8): w [out, in] ->
    (int8 [out, in], fp32 scale [out]) with w ~= int8 * scale[:, None]."""
    w = w.float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).to(torch.int8).contiguous(), scale.contiguous()


def to_panels(w: torch.Tensor) -> torch.Tensor:
    """[out, in...] -> [ceil(out / 16), in..., 16], the last panel zero-padded (csrc/panel_linear.cpp)."""
    w = F.pad(w, (0, 0, 0, -w.shape[0] % PANEL))
    return w.reshape(-1, PANEL, w.shape[1]).transpose(1, 2).contiguous()


def from_panels(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out_features]


def int8_a8_panels(w: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] -> csrc/int8_linear_a8.cpp's codes [ceil(out / 16), in / 4, 64] uint8: four
    consecutive inputs of an output per 32-bit lane, each weight offset by 128 (unsigned for vpdpbusd)."""
    panels = to_panels(w).unflatten(1, (-1, 4)).transpose(2, 3)  # [P, in / 4, 16 outputs, 4 inputs]
    return (panels.to(torch.int16) + 128).to(torch.uint8).flatten(2).contiguous()


def unoffset(codes: torch.Tensor) -> torch.Tensor:
    """int8_a8_panels' offset uint8 codes back to int8 weights, element by element."""
    return (codes.to(torch.int16) - 128).to(torch.int8)


def from_int8_a8_panels(codes: torch.Tensor, out_features: int) -> torch.Tensor:
    panels = unoffset(codes).unflatten(2, (PANEL, 4)).transpose(2, 3).flatten(1, 2)
    return from_panels(panels, out_features)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [out, in] (0..15) -> [out, in / 2] uint8, input 2k in the low nibble, 2k + 1 in the high."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()


@dataclass
class BlockWeight:
    """codes: 4-bit [out, in / 2] uint8 (pack_nibbles) or 8-bit [out, in] int8; scale [out, groups]
    fp16; minimum like scale for 4-bit codes (w = q * scale + minimum), None for 8-bit (w = q * scale).
    Packed (`panels`): codes [P, in / 2 or in, 16], scale and minimum [P, groups, 16]; with int8
    activations 4-bit codes [P, in / 8, 64] (csrc/block_linear_a8.cpp), 8-bit ones offset by 128 as
    uint8 [P, in / 4, 64] (csrc/int8_linear_a8.cpp), four inputs per output lane."""

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None
    out_features: int
    packed: bool = False
    activation_levels: int = 2  # int8 levels per activation group of the integer kernels (1: w4a8 engines)

    def __post_init__(self):
        eight_bit = torch.uint8 if self.int8_activations else torch.int8
        if self.codes.dtype != (torch.uint8 if self.minimum is not None else eight_bit):
            raise ValueError("4-bit codes (uint8) take a minimum, 8-bit codes (int8; offset uint8 packed) none")

    @property
    def bits(self) -> int:
        return 4 if self.minimum is not None else 8

    @property
    def int8_activations(self) -> bool:
        return self.packed and self.codes.shape[-1] == 4 * PANEL

    @property
    def in_features(self) -> int:
        return self.codes.shape[-2 if self.packed else 1] * (32 if self.int8_activations else 8) // self.bits

    @property
    def group_size(self) -> int:
        return self.in_features // self.scale.shape[-2 if self.packed else 1]

    def panels(self, int8_activations: bool = False, activation_levels: int = 2) -> "BlockWeight":
        """The layout csrc/block_linear.cpp reads, or with int8_activations that of csrc/block_linear_a8.cpp
        (4-bit codes) or csrc/int8_linear_a8.cpp (8-bit codes in groups of 32: GGUF Q8_0's), whose activations
        are quantized per group at run time, as llama.cpp's kernels do, to activation_levels int8 levels
        (csrc/int8_activations.h)."""
        if self.packed:
            return self
        if int8_activations and self.bits == 4:  # [P, in/8, 16 outputs, 4 inputs], k + 4 in the high nibble
            quads = to_panels(unpack_nibbles(self.codes)).unflatten(1, (-1, 2, 4)).permute(0, 1, 4, 2, 3)
            codes = (quads[..., 0, :] | (quads[..., 1, :] << 4)).flatten(2).contiguous()
        elif int8_activations and self.group_size == INT8_ACTIVATION_GROUP:
            codes = int8_a8_panels(self.codes)
        else:
            codes = to_panels(self.codes)
        return BlockWeight(
            codes,
            to_panels(self.scale),
            None if self.minimum is None else to_panels(self.minimum),
            self.out_features,
            packed=True,
            activation_levels=activation_levels,
        )

    def rows(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes, scale, minimum) of the given output rows (all by default), by rows; 4-bit codes unpacked."""
        if not self.packed:
            pick = lambda t: None if t is None else (t if index is None else t[index])  # noqa: E731
            codes = pick(self.codes)
            return (unpack_nibbles(codes) if self.bits == 4 else codes), pick(self.scale), pick(self.minimum)
        index = torch.arange(self.out_features, device=self.codes.device) if index is None else index
        pick = lambda t: None if t is None else t[index // PANEL, :, index % PANEL]  # noqa: E731
        if self.int8_activations:  # [rows, in / 8 or in / 4, 4 inputs] bytes
            lanes = self.codes.unflatten(2, (PANEL, 4))[index // PANEL, :, index % PANEL]
            if self.bits == 4:  # -> [rows, in/8, 2, 4] codes
                codes = torch.stack((lanes & 15, lanes >> 4), dim=2).flatten(1)
            else:
                codes = unoffset(lanes).flatten(1)
        else:
            codes = pick(self.codes)
            codes = unpack_nibbles(codes) if self.bits == 4 else codes
        return codes, pick(self.scale), pick(self.minimum)

    def dense(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantized fp32 rows [len(index) or out, in]: q * d + m, as the kernel computes each weight
        (the product of a code and an fp16 scale is exact in fp32, so this rounds once, like its fma)."""
        if self.packed and cpu_kernels.available():  # the embedding lookup of a decode step: one C++ call
            index = torch.arange(self.out_features) if index is None else index
            return torch.ops.sedac_cpu.block_rows(self.codes, self.scale, self.minimum, index)
        return dequantize_blocks(*self.rows(index))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] -> [T, out] on the CPU kernels (packed), else the sedac op (Triton on CUDA)."""
        if self.int8_activations and self.bits == 8:
            return torch.ops.sedac_cpu.int8_linear_a8(
                x, self.codes, self.scale, bias, self.out_features, self.activation_levels
            )
        if self.int8_activations:
            return torch.ops.sedac_cpu.block_linear_a8(
                x, self.codes, self.scale, self.minimum, bias, self.out_features, self.activation_levels
            )
        if self.packed:
            return torch.ops.sedac_cpu.block_linear(x, self.codes, self.scale, self.minimum, bias, self.out_features)
        return torch.ops.sedac.block_linear(x, self.codes, self.scale, self.minimum, bias)  # Triton on CUDA

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.minimum) if t is not None]

    def stored(self, prefix: str) -> dict[str, torch.Tensor]:
        """The engine file's tensors for the layer `prefix` (by rows): codes as its weight, scales and
        minimums beside it."""
        out = {prefix + ".weight": self.codes, prefix + SCALE_SUFFIX: self.scale}
        if self.minimum is not None:
            out[prefix + MIN_SUFFIX] = self.minimum
        return out


def quantize_int4(w: torch.Tensor, group_size: int) -> BlockWeight:
    """Round-to-nearest asymmetric 4-bit per group of inputs (GGUF Q4_1's scheme, any group size):
    scale = (max - min) / 15 and minimum = min per group, both rounded to fp16 first so that the codes
    are chosen against the values the kernel uses. w [out, in] -> BlockWeight."""
    out, inp = w.shape
    if group_size <= 0 or group_size % 2 or inp % group_size:
        raise ValueError(f"--group-size {group_size} must be even and divide every projection's inputs ({inp} here)")
    g = w.float().reshape(out, inp // group_size, group_size)
    low, high = g.amin(-1), g.amax(-1)
    scale, minimum = ((high - low) / 15).half(), low.half()  # [out, groups]
    step = scale.float().clamp(min=torch.finfo(torch.float16).tiny)[..., None]  # a constant group: codes 0
    codes = torch.round((g - minimum.float()[..., None]) / step).clamp(0, 15).to(torch.uint8)
    return BlockWeight(pack_nibbles(codes.reshape(out, inp)), scale.contiguous(), minimum.contiguous(), out)


def quantize_int8_blocks(w: torch.Tensor, group_size: int = 32) -> BlockWeight:
    """Symmetric 8-bit per group of inputs (GGUF Q8_0's scheme; the whole row when the group does not
    divide it): scale = max |w| / 127 rounded to fp16, codes round(w / scale). w [out, in] -> BlockWeight."""
    out, inp = w.shape
    group = group_size if inp % group_size == 0 else inp
    g = w.float().reshape(out, inp // group, group)
    scale = (g.abs().amax(-1) / 127).half()
    step = scale.float().clamp(min=torch.finfo(torch.float16).tiny)[..., None]
    codes = torch.round(g / step).clamp(-127, 127).to(torch.int8)
    return BlockWeight(codes.reshape(out, inp).contiguous(), scale.contiguous(), None, out)
