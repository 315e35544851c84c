"""Integration on the real SmolLM2-135M-Instruct engine (built once per session) at fp32 on CPU."""

import pytest

from sedac import LLM, SamplingParams
from sedac.builder.datasets import sharegpt_prompts
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(real_engine):
    return LLM(str(real_engine), device="cpu")


@pytest.fixture(scope="module")
def prompts(llm):
    return sharegpt_prompts(llm.tokenizer, "bench", 16, 160)


def test_greedy_token_identical_to_hf_on_16_prompts(llm, prompts, real_hf_model):
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0))
    mismatches = [i for i, (p, o) in enumerate(zip(prompts, outs)) if o.token_ids != hf_greedy(real_hf_model, p, 64)]
    assert mismatches == []
    assert sum(len(o.token_ids) for o in outs) >= 16 * 32  # real continuations, not early EOS


def test_batch_equals_alone_and_prefix_hits(llm, prompts):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    batched = llm.generate(prompts[:6], params)
    for p, out in zip(prompts[:6], batched):
        single = llm.generate([p], params)[0]
        assert single.token_ids == out.token_ids
        assert single.metrics.num_cached_tokens > 0  # the shared system prompt and this prompt are cached


def test_chat_answers_sensibly(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=32, temperature=0.0)
    )[0]
    assert "Paris" in out.text and out.finish_reason in ("stop", "length")
