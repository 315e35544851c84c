"""The runner's CUDA attention path on CPU: the varlen context and the Triton paged-attention kernel (under
TRITON_INTERPRET=1) inside the real engine give the CPU path's greedy tokens, through chunked prefill, a
prefix-cache hit and batched decodes."""

from sedac import LLM, SamplingParams
from sedac.plugins import triton_attention


def test_varlen_attention_in_the_engine_matches_the_cpu_path(tiny_llama, monkeypatch):
    prefix = list(range(200, 240))
    prompts = [prefix + [7, 8, 9], prefix + [10, 11], list(range(300, 370)), [5]]
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    expected = [o.token_ids for o in LLM(str(tiny_llama), device="cpu").generate(prompts, greedy)]

    calls = []
    kernel = triton_attention.paged_attention
    monkeypatch.setattr(
        triton_attention, "paged_attention", lambda *a, **k: calls.append(a[6]) or kernel(*a, **k)
    )  # records max_query_len
    llm = LLM(str(tiny_llama), device="cpu", max_num_batched_tokens=32)
    llm.engine.runner.varlen = True
    first = llm.generate(prompts[:1], greedy)
    rest = llm.generate(prompts[1:], greedy)
    assert [o.token_ids for o in first + rest] == expected
    assert llm.engine.blocks.prefix_hits > 0
    assert 1 in calls and max(calls) > 16  # decode steps and long prefill chunks both ran through the kernel
