"""The runner's CUDA code path on CPU: the varlen context, the Triton paged-attention kernel and the fused layer
kernels (under TRITON_INTERPRET=1) inside the real engine give the CPU path's greedy tokens, through chunked
prefill, a prefix-cache hit and batched decodes."""

import pytest
import torch

from sedac import LLM, SamplingParams
from sedac.models import cpu_kernels, decoder, layers
from sedac.plugins import triton_attention, triton_fused

PREFIX = list(range(200, 240))
PROMPTS = [PREFIX + [7, 8, 9], PREFIX + [10, 11], list(range(300, 370)), [5]]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def expected(tiny_llama):
    return [o.token_ids for o in LLM(str(tiny_llama), device="cpu").generate(PROMPTS, GREEDY)]


def _calls(monkeypatch, module, name: str) -> list:
    """Record the calls of module.name (their first argument's row count) as it runs."""
    calls, kernel = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(len(a[0])) or kernel(*a, **k))
    return calls


def _generate_in_two_rounds(llm):
    """The first prompt alone, then the rest: the second prompt hits the first's cached prefix."""
    outs = llm.generate(PROMPTS[:1], GREEDY) + llm.generate(PROMPTS[1:], GREEDY)
    assert llm.engine.blocks.prefix_hits > 0
    return [o.token_ids for o in outs]


def test_varlen_attention_in_the_engine_matches_the_cpu_path(tiny_llama, expected, monkeypatch):
    queries = _calls(monkeypatch, triton_attention, "paged_attention")
    llm = LLM(str(tiny_llama), device="cpu", max_num_batched_tokens=32)
    llm.engine.runner.varlen = True
    assert _generate_in_two_rounds(llm) == expected
    assert 1 in queries and max(queries) > 16  # decode steps and long prefill chunks both ran through the kernel


def test_the_cuda_layer_code_in_the_engine_matches_the_cpu_path(tiny_llama, expected, monkeypatch):
    """No C++ kernels: norms, rotary with the cache write, and SiLU through the Triton kernels as on CUDA,
    attention through varlen."""
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "usable", lambda x: False)
    for module in (layers, decoder):
        monkeypatch.setattr(module, "fused_kernels", lambda x: None if torch.is_grad_enabled() else triton_fused)
    norms, rotary, silu = (
        _calls(monkeypatch, triton_fused, n) for n in ("rms_norm", "rotary_and_cache", "silu_and_mul")
    )
    llm = LLM(str(tiny_llama), device="cpu", max_num_batched_tokens=32)
    llm.engine.runner.varlen = True
    assert _generate_in_two_rounds(llm) == expected
    assert norms and rotary and silu
