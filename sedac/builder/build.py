"""Orchestrate a build: resolve the source, convert weights, save tokenizer, config and report."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from sedac.builder.convert import convert_checkpoint, model_config_from_hf, quantize_linears
from sedac.builder.gguf_blocks import gguf_engine_weights
from sedac.builder.sedac_build import SedacOptions, add_sedac
from sedac.builder.sources import resolve_source
from sedac.config import (
    DEFAULT_GROUP_SIZE,
    PRECISIONS,
    WEIGHT_ONLY,
    WEIGHTS_FILE,
    BuildConfig,
    EngineConfig,
    weight_format,
)
from sedac.runtime.reasoning import ReasoningMarkers


def build_engine(
    model: str,
    output: str | Path,
    build: BuildConfig,
    sedac: SedacOptions | None = None,
    reasoning: ReasoningMarkers | None = None,
) -> dict:
    """Compile `model` into the engine directory `output` (with SEDAC exits when `sedac` is given). The
    model's reasoning markers: `reasoning`, else `<think>` / `</think>` when its chat template uses them."""
    build.validate()
    if sedac is not None:
        sedac.validate()
        sedac.drafts(build.precision)  # no cheaper copy, or a bad --draft-precision, fails before any work
    started = time.time()
    source = resolve_source(model)
    tokenizer = source.load_tokenizer()
    eos = _eos_ids(source.hf_config, tokenizer)
    cfg = model_config_from_hf(source.hf_config, eos)
    if getattr(source.hf_config, "sliding_window", None) and source.hf_config.sliding_window < build.max_seq_len:
        raise ValueError(
            f"sliding-window attention ({source.hf_config.sliding_window}) is not supported; "
            f"use --max-seq-len <= {source.hf_config.sliding_window}"
        )
    if build.max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"max_seq_len {build.max_seq_len} exceeds the model's {cfg.max_position_embeddings} positions")
    if sedac is not None:
        sedac.layers(cfg.num_layers)  # a bad --exit-layers fails before any work
    if tokenizer.chat_template is None:
        raise ValueError("the model's tokenizer has no chat template")
    weights = _engine_weights(source, cfg, build)

    out = Path(output)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    markers = reasoning or ReasoningMarkers.from_template(tokenizer.chat_template)
    EngineConfig(model=cfg, build=build, reasoning=asdict(markers) if markers else None).save(tmp)
    report = {
        "source": source.description,
        "architecture": cfg.architecture,
        "precision": build.precision,
        "parameters": sum(t.numel() for t in weights.values()),
        "weights_bytes": (tmp / WEIGHTS_FILE).stat().st_size,
        "build": asdict(build),
        "build_seconds": round(time.time() - started, 2),
        "reasoning_markers": asdict(markers) if markers else None,
        "torch": torch.__version__,
    }
    if sedac is not None:
        report["sedac"] = add_sedac(tmp, sedac)
        report["build_seconds"] = round(time.time() - started, 2)
    (tmp / "build_report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)  # an engine is replaced whole, never half-written
    tmp.rename(out)
    return report


def _engine_weights(source, cfg, build: BuildConfig) -> dict[str, torch.Tensor]:
    dtype = getattr(torch, PRECISIONS[build.precision])
    if build.precision == "gguf":
        if source.gguf_path is None:
            raise ValueError(
                "--precision gguf keeps a GGUF file's own blocks and needs a .gguf source; "
                "for this model use int4 or int8"
            )
        return gguf_engine_weights(source.gguf_path, cfg)
    if (weights := weight_format(build.precision)) in WEIGHT_ONLY:  # from the source's own precision
        fp32 = convert_checkpoint(source.tensors(), cfg, torch.float32)
        return quantize_linears(fp32, dtype, weights, build.group_size or DEFAULT_GROUP_SIZE)
    return convert_checkpoint(source.tensors(), cfg, dtype)


def _eos_ids(hf_config, tokenizer) -> list[int]:
    ids = hf_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in ids]
