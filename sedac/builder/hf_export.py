"""The inverse of convert: an HF transformers model from an engine, for side-by-side baselines."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sedac.config import MIN_SUFFIX, SCALE_SUFFIX, WEIGHTS_FILE, EngineConfig, ModelConfig
from sedac.models.quant import BlockWeight


def hf_config(cfg: ModelConfig):
    from transformers import AutoConfig

    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_ids or None,
        rope_parameters=rope,
    )
    if cfg.architecture == "llama":
        kwargs["attention_bias"] = cfg.qkv_bias
    return AutoConfig.for_model(cfg.architecture, **kwargs)


def hf_state_dict(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": weights["embed_tokens.weight"], "model.norm.weight": weights["norm.weight"]}
    out["lm_head.weight"] = (
        weights["lm_head.weight"].t() if "lm_head.weight" in weights else out["model.embed_tokens.weight"]
    )
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = weights[src + "input_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = weights[src + "post_norm.weight"]
        out[dst + "self_attn.o_proj.weight"] = weights[src + "o_proj.weight"].t()
        out[dst + "mlp.down_proj.weight"] = weights[src + "down_proj.weight"].t()
        for name, part in zip(("q", "k", "v"), weights[src + "qkv_proj.weight"].t().split((q, kv, kv))):
            out[dst + f"self_attn.{name}_proj.weight"] = part
        if cfg.qkv_bias:
            for name, part in zip(("q", "k", "v"), weights[src + "qkv_proj.bias"].split((q, kv, kv))):
                out[dst + f"self_attn.{name}_proj.bias"] = part
        gate, up = weights[src + "gate_up_proj.weight"].t().chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}


def dequantized(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight-only layers (int8 rows, int4 or gguf blocks; a gguf embedding table too) as fp32 in the
    engine layout ([in, out] for linears)."""
    out = {k: v for k, v in weights.items() if not k.endswith((SCALE_SUFFIX, MIN_SUFFIX))}
    for name in [k for k in weights if k.endswith(SCALE_SUFFIX)]:
        prefix = name[: -len(SCALE_SUFFIX)]
        codes, scale = weights[prefix + ".weight"], weights[name]
        if scale.dim() == 1:
            dense = codes.float() * scale.float()[:, None]
        else:
            dense = BlockWeight(codes, scale, weights.get(prefix + MIN_SUFFIX), codes.shape[0]).dense()
        out[prefix + ".weight"] = dense if prefix == "embed_tokens" else dense.t()
    return out


def load_hf_model(engine_dir: str | Path, dtype: torch.dtype = torch.float32):
    """An HF AutoModelForCausalLM with exactly the engine's weights (fp32 by default; quantized ones dequantized)."""
    from transformers import AutoModelForCausalLM

    cfg = EngineConfig.load(Path(engine_dir)).model
    weights = dequantized(load_file(str(Path(engine_dir) / WEIGHTS_FILE)))
    model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in hf_state_dict(weights, cfg).items()}, strict=False)
    return model.eval()
