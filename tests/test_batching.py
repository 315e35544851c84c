"""Inflight batching invariants on a tiny model: batch == alone, cache hit == miss, preemption resumes."""

from sedac import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(10, 10 + n)) for n in (3, 17, 40, 9, 64, 1, 33, 5)]


def alone(llm, prompts, params=GREEDY):
    return [llm.generate([p], params)[0].token_ids for p in prompts]


def test_mixed_batch_equals_each_alone(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu")
    batched = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert batched == alone(llm, PROMPTS)


def test_chunked_prefill_equals_whole_prefill(tiny_llama):
    whole = LLM(str(tiny_llama), device="cpu")
    chunked = LLM(str(tiny_llama), device="cpu", max_num_batched_tokens=8)
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == alone(whole, PROMPTS)


def test_prefix_cache_hit_gives_same_tokens(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu")
    prompt = list(range(200, 250))
    miss = llm.generate([prompt], GREEDY)[0]
    hit = llm.generate([prompt], GREEDY)[0]
    assert miss.metrics.num_cached_tokens == 0
    assert hit.metrics.num_cached_tokens >= 44  # all full blocks but the one holding the last token
    assert hit.token_ids == miss.token_ids
    shared_prefix = prompt[:30] + [7, 7, 7]
    other = llm.generate([shared_prefix], GREEDY)[0]
    assert other.metrics.num_cached_tokens == 28
    assert other.token_ids == LLM(str(tiny_llama), device="cpu").generate([shared_prefix], GREEDY)[0].token_ids


def test_preempted_requests_resume_to_same_tokens(tiny_llama):
    roomy = LLM(str(tiny_llama), device="cpu")
    expected = [o.token_ids for o in roomy.generate(PROMPTS, GREEDY)]
    # Room for one max_seq_len sequence (256 tokens) only: eight growing sequences must preempt.
    per_block = roomy.engine.runner.kv_bytes_per_block()
    tight = LLM(str(tiny_llama), device="cpu", kv_cache_memory=per_block * 64)
    assert tight.engine.blocks.num_blocks == 64
    got = [
        o.token_ids for o in tight.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    ]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected


def test_kv_pool_within_budget_and_all_blocks_free_after(tiny_llama):
    budget = 3 * 1024 * 1024
    llm = LLM(str(tiny_llama), device="cpu", kv_cache_memory=budget)
    assert llm.engine.runner.kv_cache_bytes <= budget
    layer = llm.engine.runner.model.layers[0]
    total = sum(l.k_cache.nbytes + l.v_cache.nbytes for l in llm.engine.runner.model.layers)
    assert total == llm.engine.runner.kv_cache_bytes and layer.k_cache.shape[0] % 4 == 0
    peak = 0
    for i, p in enumerate(PROMPTS):
        llm.engine.add_request(str(i), p, SamplingParams(max_tokens=30, temperature=0.8, seed=i, n=2))
    finished = []
    while llm.engine.has_unfinished_requests():
        outs = llm.engine.step()
        assert len({o.request_id for o in outs}) == len(outs)  # one output per request per step
        finished += [o.request_id for o in outs if o.finished]
        peak = max(peak, llm.engine.blocks.num_blocks - llm.engine.blocks.num_free_blocks)
    assert sorted(finished) == sorted(str(i) for i in range(len(PROMPTS)))
    assert 0 < peak <= llm.engine.blocks.num_blocks
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert all(r == 0 for r in llm.engine.blocks.ref_counts)


def test_priority_and_abort_frees_blocks(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", max_num_seqs=1)
    eng = llm.engine
    eng.add_request("late", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0, priority=1))
    eng.add_request("urgent", [8, 9, 10], SamplingParams(max_tokens=5, temperature=0.0, priority=0))
    eng.step()
    assert [s.request_id for s in eng.scheduler.running] == ["urgent"]
    eng.add_request("long", list(range(60)), SamplingParams(max_tokens=100, temperature=0.0))
    while eng.has_unfinished_requests() and "long" not in {s.request_id for s in eng.scheduler.running}:
        eng.step()
    eng.step()
    out = eng.abort_request("long")
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.token_ids) >= 1
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
