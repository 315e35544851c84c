"""`--precision gguf`: an engine that keeps every tensor of a GGUF file in the file's own format.

Q4_0, Q4_1 and Q8_0 blocks become the engine's block weights (sedac.models.quant.BlockWeight) without
a dequantize/requantize step: a Q4_1 block's scale and minimum are fp16 and its codes 4-bit, exactly
what the block kernel reads; Q4_0 is Q4_1 with minimum -8 * scale (exact in fp16); Q8_0 is int8
codes with an fp16 scale. F32 and F16 tensors stay as they are. Names map as transformers' GGUF
loader maps them, and llama's Q/K rows are un-permuted the same way, so a gguf engine holds exactly
the weights the fp32 engine built from the same file holds, undequantized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from sedac.config import ModelConfig
from sedac.models.quant import BlockWeight, pack_nibbles

Q = GGMLQuantizationType
SUPPORTED = "Q4_0, Q4_1, Q8_0, F16, F32"
_LINEARS = {"o_proj": ("attn_output",), "gate_up_proj": ("ffn_gate", "ffn_up"), "down_proj": ("ffn_down",)}


def gguf_engine_weights(path: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The engine's weights (names and layout as convert_checkpoint's) from the GGUF file's tensors."""
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def take(name: str):
        if name not in tensors:
            raise ValueError(f"GGUF file is missing tensor {name}")
        return _read(tensors.pop(name))

    out = {"norm.weight": take("output_norm.weight")}
    out.update(_stored("embed_tokens", take("token_embd.weight"), transpose=False))
    if not cfg.tie_word_embeddings:
        out.update(_stored("lm_head", take("output.weight")))
    for i in range(cfg.num_layers):
        blk, dst = f"blk.{i}.", f"layers.{i}."
        out[dst + "input_norm.weight"] = take(blk + "attn_norm.weight")
        out[dst + "post_norm.weight"] = take(blk + "ffn_norm.weight")
        heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads, "attn_v": None}
        parts = {p: take(f"{blk}{p}.weight") for p in heads}
        if arch == "llama":  # llama.cpp's converter permutes Q/K rows for its rotary layout
            parts = {p: t if n is None else _permute_rows(t, n) for (p, n), t in zip(heads.items(), parts.values())}
        out.update(_stored(dst + "qkv_proj", _concat(list(parts.values()), f"{blk}attn_q/k/v")))
        if cfg.qkv_bias:
            biases = [take(f"{blk}{p}.bias") for p in heads]
            if arch == "llama":
                biases = [b if n is None else _permute_rows(b, n) for b, n in zip(biases, heads.values())]
            out[dst + "qkv_proj.bias"] = torch.cat(biases)
        for name, srcs in _LINEARS.items():
            out.update(_stored(dst + name, _concat([take(f"{blk}{s}.weight") for s in srcs], blk + "/".join(srcs))))
    tensors.pop("rope_freqs.weight", None)  # rotary tables the engine computes itself
    if tensors:
        raise ValueError(f"unexpected tensors in the GGUF file (unsupported variant?): {sorted(tensors)[:5]}")
    return out


def _read(t) -> torch.Tensor | BlockWeight:
    """A GGUF tensor as a float tensor ([out, in] for matrices) or a BlockWeight."""
    kind = Q(t.tensor_type)
    if kind in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(t.data))
    sizes = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}
    if kind not in sizes:
        raise ValueError(
            f"GGUF tensor {t.name} is {kind.name}; --precision gguf computes on {SUPPORTED} "
            "(use --precision int4, int8, fp16 or bf16 to convert it instead)"
        )
    raw = torch.from_numpy(np.array(t.data)).view(torch.uint8)
    blocks = raw.reshape(raw.shape[0], -1, sizes[kind])  # [out, groups, block bytes]
    scale = _halves(blocks[..., 0:2])
    if kind == Q.Q8_0:
        codes = blocks[..., 2:].contiguous().view(torch.int8).flatten(1)
        return BlockWeight(codes, scale, None, raw.shape[0])
    minimum = _halves(blocks[..., 2:4]) if kind == Q.Q4_1 else scale * -8  # exact: a power of two
    qs = blocks[..., sizes[kind] - 16 :]  # element j in qs[j]'s low nibble, 16 + j in its high
    codes = torch.cat((qs & 15, qs >> 4), dim=-1).flatten(1)
    return BlockWeight(pack_nibbles(codes), scale, minimum, raw.shape[0])


def _halves(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1)


def _permute_rows(t, n_head: int):
    """transformers' reverse_permute of llama's Q/K rows, on a float tensor or a BlockWeight's rows."""
    rows = t.shape[0] if isinstance(t, torch.Tensor) else t.out_features
    index = torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).flatten()
    if isinstance(t, torch.Tensor):
        return t[index]
    return BlockWeight(t.codes[index], t.scale[index], None if t.minimum is None else t.minimum[index], rows)


def _concat(parts: list, what: str):
    """Fused projections (q|k|v, gate|up) by rows; the parts must share one format."""
    if all(isinstance(p, torch.Tensor) and p.dtype == parts[0].dtype for p in parts):
        return torch.cat(parts)
    if not all(
        isinstance(p, BlockWeight) and p.bits == parts[0].bits and p.group_size == parts[0].group_size for p in parts
    ):
        raise ValueError(
            f"GGUF tensors {what} mix formats; --precision gguf fuses them, so they need one format "
            "(use --precision int4 or int8 instead)"
        )
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return BlockWeight(
        cat([p.codes for p in parts]),
        cat([p.scale for p in parts]),
        cat([p.minimum for p in parts]),
        sum(p.out_features for p in parts),
    )


def _stored(prefix: str, t, transpose: bool = True) -> dict[str, torch.Tensor]:
    """Engine tensors for one weight: float [in, out] for linears ([rows, hidden] for an embedding), or
    codes with scales and minimums by rows."""
    if isinstance(t, torch.Tensor):
        return {prefix + ".weight": (t.t() if transpose else t).contiguous()}
    return t.stored(prefix)
