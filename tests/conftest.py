"""Shared fixtures: tiny random Llama/Qwen2 models (fast) and the real SmolLM2 engine (once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors (set before import)

from sedac.builder import build_engine  # noqa: E402
from sedac.builder.sources import smollm2_gguf_path  # noqa: E402
from sedac.config import BuildConfig  # noqa: E402
from sedac.runtime.reasoning import ReasoningMarkers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    if carried := os.environ.get("SEDAC_TEST_TOKENIZER"):  # a GPU machine: the tokenizer files travel, the GGUF not
        return AutoTokenizer.from_pretrained(carried)
    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def make_tiny_hf_model(root: Path, arch: str, tokenizer, seed: int = 0) -> Path:
    """A random HF checkpoint of real structure, with weights large enough for decisive argmaxes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=arch == "qwen2",
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = root / f"tiny-{arch}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_hf_model(root, arch, smollm2_tokenizer) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    engines = {}
    for arch, path in tiny_models.items():
        engines[arch] = root / arch
        build_engine(
            str(path),
            engines[arch],
            BuildConfig(max_batch_size=8, max_seq_len=256, max_num_tokens=256, kv_block_size=4),
        )
    return engines


@pytest.fixture(scope="session")
def tiny_llama(tiny_engines) -> Path:
    return tiny_engines["llama"]


@pytest.fixture(scope="session")
def real_engine() -> Path:
    """The real SmolLM2 engine with default settings, built once (shared with `make demo`)."""
    path = ROOT / "engines" / "smollm2"
    if not (path / "config.json").is_file():
        build_engine("smollm2-135m-instruct", path, BuildConfig())
    return path


@pytest.fixture(scope="session")
def real_hf_model():
    """HF transformers' own load of the GGUF: the independent reference for parity."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


TINY_SEDAC = dict(
    exit_layers="1,2", calib_tokens=512, train_tokens=2048, epochs=1, exit_vocab=2048, seq_len=128, ghost_tokens=2048
)


@pytest.fixture(scope="session")
def tiny_sedac_engine(tmp_path_factory, tiny_models) -> Path:
    """The tiny Llama with SEDAC exit heads trained and calibrated (exits at layers 1 and 2 of 3)."""
    from sedac.builder import SedacOptions

    path = tmp_path_factory.mktemp("sedac") / "llama"
    build_engine(
        str(tiny_models["llama"]),
        path,
        BuildConfig(max_batch_size=8, max_seq_len=256, max_num_tokens=256, kv_block_size=4),
        SedacOptions(**TINY_SEDAC),
    )
    return path


@pytest.fixture(scope="session")
def real_sedac_engine() -> Path:
    """The real SmolLM2 engine built with --sedac at default settings, once (shared with the README bench)."""
    from sedac.builder import SedacOptions

    path = ROOT / "engines" / "smollm2-sedac"
    if not (path / "sedac.safetensors").is_file():
        build_engine("smollm2-135m-instruct", path, BuildConfig(), SedacOptions())
    return path


MARKERS = ReasoningMarkers("<think>", "</think>")


@pytest.fixture(scope="session")
def thinking_engine(tiny_models, tmp_path_factory):
    """The tiny Llama built with reasoning markers (<think> / </think>)."""
    path = tmp_path_factory.mktemp("reasoning") / "tiny"
    build_engine(
        str(tiny_models["llama"]),
        path,
        BuildConfig(max_batch_size=8, max_seq_len=256, max_num_tokens=256, kv_block_size=4),
        reasoning=MARKERS,
    )
    return path
