"""Map an HF Llama/Qwen2 checkpoint onto the engine layout: fused QKV and gate/up, weights [in, out]."""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm import tqdm

from sedac.config import SCALE_SUFFIX, SUPPORTED_ARCHITECTURES, ModelConfig
from sedac.models.quant import quantize_int4, quantize_int8_blocks, quantize_rows


def model_config_from_hf(hf, eos_token_ids: list[int] | None = None) -> ModelConfig:
    arch = hf.model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2/Qwen2.5)"
        )
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported activation {hf.hidden_act!r}; only silu is supported")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    heads = hf.num_attention_heads
    eos = eos_token_ids or _as_list(hf.eos_token_id)
    return ModelConfig(
        architecture=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=theta,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        bos_token_id=hf.bos_token_id,
        eos_token_ids=eos,
        rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
    )


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


_RENAME = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_norm.weight",
    "self_attn.o_proj.weight": "o_proj.weight",
    "mlp.down_proj.weight": "down_proj.weight",
}
_FUSED = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def convert_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    hf = {
        name: t
        for name, t in tqdm(tensors, desc="reading weights", unit="tensor", leave=False)
        if "rotary_emb" not in name
    }
    out = {"embed_tokens.weight": hf.pop("model.embed_tokens.weight"), "norm.weight": hf.pop("model.norm.weight")}
    lm_head = hf.pop("lm_head.weight", None)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = _required(lm_head, "lm_head.weight").t()
    for i in tqdm(range(cfg.num_layers), desc="converting layers", unit="layer"):
        prefix = f"model.layers.{i}."
        for src, dst in _RENAME.items():
            t = _required(hf.pop(prefix + src, None), prefix + src)
            out[f"layers.{i}.{dst}"] = t.t() if t.dim() == 2 else t
        for fused, parts in _FUSED.items():
            out[f"layers.{i}.{fused}.weight"] = torch.cat([_pop(hf, prefix, p, "weight") for p in parts]).t()
            if fused == "qkv_proj" and cfg.qkv_bias:
                out[f"layers.{i}.qkv_proj.bias"] = torch.cat([_pop(hf, prefix, p, "bias") for p in parts])
    if hf:
        raise ValueError(f"unexpected tensors in checkpoint (unsupported variant?): {sorted(hf)[:5]}")
    return {name: t.to(dtype).contiguous() for name, t in out.items()}


def _pop(hf: dict, prefix: str, part: str, kind: str) -> torch.Tensor:
    name = f"{prefix}{part}.{kind}"
    return _required(hf.pop(name, None), name)


def _required(t, name: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"checkpoint is missing tensor {name}")
    return t


def quantize_linears(
    weights: dict[str, torch.Tensor], dtype: torch.dtype, precision: str, group_size: int
) -> dict[str, torch.Tensor]:
    """Weight-only int8: every projection int8 [out, in] with fp32 scales per output; the LM head stays in
    `dtype`, as TensorRT-LLM's quantization excludes lm_head by default (its argmax is the token, and the
    greedy screen already reads an int8 copy of it at decode).
    int4: every projection as 4-bit codes with fp16 scales and minimums per `group_size` inputs, and the
    head (with a tied embedding table) as 8-bit codes per 32 inputs, as llama.cpp's Q4 files keep theirs
    at 6-8 bits: a third of fp16's bytes, and no screen copy beside it.
    The other tensors in `dtype`."""
    head = "lm_head.weight" if "lm_head.weight" in weights else "embed_tokens.weight"
    out = {}
    for name, t in weights.items():
        prefix = name[: -len(".weight")]
        if precision == "int8" and name.endswith("proj.weight"):
            out[name], out[prefix + SCALE_SUFFIX] = quantize_rows(t.t())
        elif precision == "int4" and (name.endswith("proj.weight") or name == head):
            rows = t if name == "embed_tokens.weight" else t.t()  # [out, in]
            blocks = quantize_int4(rows, group_size) if name != head else quantize_int8_blocks(rows)
            out.update(blocks.stored(prefix))
        else:
            out[name] = t.to(dtype).contiguous()
    return out
