"""Token-identical greedy decoding against HF transformers on tiny random Llama and Qwen2 models."""

import pytest
import torch

from sedac import LLM, SamplingParams
from tests.conftest import hf_greedy

PROMPTS = [[1, 520, 9531, 198], [42] * 3 + [7, 8, 9, 10, 11, 12, 13], list(range(100, 141)), [5]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_hf(arch, tiny_models, tiny_engines):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    llm = LLM(str(tiny_engines[arch]), device="cpu")
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 24)


def test_engine_roundtrips_to_hf(tiny_models, tiny_engines):
    """hf_export (used by the benchmark baseline) reproduces the original checkpoint exactly."""
    from transformers import AutoModelForCausalLM

    from sedac.builder.hf_export import load_hf_model

    for arch in ("llama", "qwen2"):
        original = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).state_dict()
        rebuilt = load_hf_model(tiny_engines[arch]).state_dict()
        for name, tensor in original.items():
            assert torch.equal(rebuilt[name], tensor), name
