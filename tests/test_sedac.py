"""SEDAC on a tiny random Llama: lossless == off, speculative sampling keeps the distribution, costs count
every pass, modes mix in one batch, aborts free blocks (lossy mode and calibration: test_sedac_lossy.py)."""

import json

import pytest
import torch

from sedac import LLM, SamplingParams
from sedac.builder import calibration as cal
from sedac.runtime.engine import LLMEngine
from sedac.runtime.speculative import draft_plan, pass_cost

PROMPTS = ["Hello there, how are", "The capital of France is", "def fib(n):", "a b c d e f g", "Once"]


@pytest.fixture(scope="module")
def llm(tiny_sedac_engine):
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    always_draft(llm.engine)
    return llm


def always_draft(engine: LLMEngine):
    """Draft at every batch size whatever the tiny model's measured costs plan, so verification is exercised."""
    engine.config.sedac["draft_max_entropy"] = 1e9
    engine.sedac.drafts_by_batch = [0] + [engine.config.sedac["draft_len"]] * engine.scheduler.max_num_seqs
    engine.sedac._min_drafting = lambda num_seqs: 0.0  # a tiny model's draft pass may cost as much as a full one


def greedy(mode, **kw):
    return SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, sedac_mode=mode, **kw)


def prefill_share(costs, outs) -> float:
    """A token's share of the one prefill pass that computed every prompt of outs (their first tokens)."""
    rows = sum(len(o.prompt_token_ids) for o in outs)
    return pass_cost(costs, "full", rows) / rows


def exit_everything(engine: LLMEngine):
    """Thresholds no token misses, so the lossy path (exit + KV propagation) runs on every decode."""
    engine.sedac.exit_controller.levels = [(a, [1e9] * len(t)) for a, t in engine.sedac.exit_controller.levels]
    engine.sedac.exit_controller.audit_every = 10**9


def test_engine_holds_trained_exits(tiny_sedac_engine):
    cfg = json.loads((tiny_sedac_engine / "config.json").read_text())["sedac"]
    assert cfg["exit_layers"] == [1, 2] and cfg["draft_len"] >= 1 and 0 <= cfg["draft_agreement"] <= 1
    assert all(len(cfg["costs"][p]) == 2 and cfg["costs"][p][1] > 0 for p in ("full", "draft"))  # measured
    candidates = cfg["draft_candidates"]  # both copies measured over the fp32 base, the better one kept
    assert set(candidates) == {"int8", "int4"} and all(c["draft_pass_cost"] > 0 for c in candidates.values())
    assert cfg["predicted_lossless_speedup"] == max(c["predicted_lossless_speedup"] for c in candidates.values())
    assert cfg["predicted_lossless_speedup"] == candidates[cfg["draft_precision"]]["predicted_lossless_speedup"]
    assert set(cfg["thresholds"]) == set(cfg["precision_thresholds"]) == {str(a) for a in cal.AGREEMENT_LEVELS}
    assert cfg["lossy_exit"] in ("precision", "depth") and 0 <= cfg["precision_exit_fraction"]["0.99"] <= 1
    calibration = json.loads((tiny_sedac_engine / "sedac_calibration.json").read_text())
    for curves in (calibration["curves"], calibration["precision_curves"]):
        assert curves["0.99"] and all("agreement" in point for point in curves["0.99"])
    assert (tiny_sedac_engine / "sedac.safetensors").is_file()


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3, "bad_words": ["the"]}, {"logprobs": 2}])
def test_lossless_greedy_is_token_identical_to_off(llm, extra):
    off = llm.generate(PROMPTS, greedy("off", **extra))
    lossless = llm.generate(PROMPTS, greedy("lossless", **extra))
    assert [o.token_ids for o in lossless] == [o.token_ids for o in off]
    assert llm.engine.counters["sedac_drafted_tokens"] > 0
    assert all(o.metrics.acceptance_rate is not None for o in lossless)
    if "logprobs" in extra:
        for a, b in zip(off, lossless):
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)


def test_lossless_respects_max_tokens_and_stops(llm):
    off = llm.generate(PROMPTS, SamplingParams(max_tokens=7, temperature=0.0, stop=["e"]))
    lossless = llm.generate(PROMPTS, SamplingParams(max_tokens=7, temperature=0.0, stop=["e"], sedac_mode="lossless"))
    assert [(o.text, o.token_ids, o.finish_reason) for o in lossless] == [
        (o.text, o.token_ids, o.finish_reason) for o in off
    ]
    assert all(len(o.token_ids) <= 7 for o in lossless)


def _chi2_homogeneity_p(a: list[int], b: list[int]) -> float:
    """p-value of a two-sample chi-square test that a and b draw from one distribution; categories
    expected fewer than 5 times are pooled."""
    counts = {}
    for i, sample in enumerate((a, b)):
        for t in sample:
            counts.setdefault(t, [0, 0])[i] += 1
    rows, pooled = [], [0, 0]
    for ca, cb in counts.values():
        if (ca + cb) * min(len(a), len(b)) / (len(a) + len(b)) < 5:
            pooled = [pooled[0] + ca, pooled[1] + cb]
        else:
            rows.append((ca, cb))
    if sum(pooled):
        rows.append(tuple(pooled))
    n, stat = len(a) + len(b), 0.0
    for ca, cb in rows:
        for count, size in ((ca, len(a)), (cb, len(b))):
            expected = (ca + cb) * size / n
            stat += (count - expected) ** 2 / expected
    dof = max(1, len(rows) - 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


SPEC_SAMPLES, SPEC_TOKENS, SPEC_ALPHA = 800, 4, 0.001


def _sampled_tokens(llm, mode):
    params = [
        SamplingParams(max_tokens=SPEC_TOKENS, temperature=1.0, top_k=4, seed=s, ignore_eos=True, sedac_mode=mode)
        for s in range(SPEC_SAMPLES)
    ]
    return llm.generate([PROMPTS[1]] * SPEC_SAMPLES, params)


def test_lossless_sampling_keeps_the_distribution(tiny_sedac_engine, monkeypatch):
    """Speculative sampling with drafts really made, from a deliberately poor drafter (int8 head rows
    rescaled), must still sample the full model's distribution: at each drafted position, a chi-square
    test of lossless vs off (800 samples each) keeps p > 0.001. The same test rejects a broken acceptance
    rule (always accept the draft), so it can fail."""
    from sedac.runtime import speculative

    llm = LLM(str(tiny_sedac_engine), device="cpu")
    always_draft(llm.engine)
    llm.engine.runner.make_draft_copies("int8")
    scale = llm.engine.runner.model.lm_head.int8[1]
    scale[::2] *= 3.0  # the drafter now prefers even token ids
    off = _sampled_tokens(llm, "off")
    lossless = _sampled_tokens(llm, "lossless")
    acceptance = [o.metrics.acceptance_rate for o in lossless if o.metrics.acceptance_rate is not None]
    assert len(acceptance) == SPEC_SAMPLES  # every request drafted
    assert 0.05 < sum(acceptance) / len(acceptance) < 0.95  # and some drafts were rejected
    for pos in range(1, SPEC_TOKENS):
        p = _chi2_homogeneity_p([o.token_ids[pos] for o in off], [o.token_ids[pos] for o in lossless])
        assert p > SPEC_ALPHA, (pos, p)

    def accept_every_draft(logits, views, drafts, qs, constrain):
        probs = speculative.filtered_probs(speculative.process(logits, views), [v.params for v in views])
        tokens = list(drafts) + [speculative.draw(probs[len(drafts)], views[0].generator)]
        return tokens, speculative.token_logprobs(None, tokens, views[: len(tokens)])

    monkeypatch.setattr(speculative, "_accept_sampled", accept_every_draft)
    broken = _sampled_tokens(llm, "lossless")
    assert (
        min(
            _chi2_homogeneity_p([o.token_ids[pos] for o in off], [o.token_ids[pos] for o in broken])
            for pos in range(1, SPEC_TOKENS)
        )
        < SPEC_ALPHA
    )


@pytest.mark.parametrize("max_entropy", [1e9, 0.0])
def test_lossless_cost_counts_every_draft_pass(tiny_sedac_engine, monkeypatch, max_entropy):
    """Batch 1: the request's cost is each cycle's draft passes, their drafts kept or not (max_entropy 0: every
    pass runs and no draft is confident enough to keep, so lossless spends more than off), and its verify
    pass, priced by the build's costs; the engine-wide ratio agrees with the request's."""
    from sedac.runtime import sedac_steps

    llm = LLM(str(tiny_sedac_engine), device="cpu")
    always_draft(llm.engine)
    llm.engine.config.sedac["draft_max_entropy"] = max_entropy
    cycles = []
    step = sedac_steps.speculative_step
    monkeypatch.setattr(sedac_steps, "speculative_step", lambda *a, **k: cycles.extend(r := step(*a, **k)) or r)
    out = llm.generate([PROMPTS[0]], greedy("lossless"))[0]
    costs = llm.engine.config.sedac["costs"]
    assert cycles and any(c.draft_passes for c in cycles)
    first = prefill_share(costs, [out])  # the prefill's token, as off pays it
    spent = first + sum(
        len(c.draft_passes) * pass_cost(costs, "draft", 1) + pass_cost(costs, "full", c.drafted + 1) for c in cycles
    )
    assert out.metrics.skip_ratio == pytest.approx(1 - spent / (first + 23))
    assert llm.engine.stats()["sedac_skip_ratio"] == pytest.approx(out.metrics.skip_ratio)
    if max_entropy == 0.0:
        assert not any(c.drafted for c in cycles) and out.metrics.skip_ratio < 0


@pytest.mark.parametrize("lossy_exit", ["precision", "depth"])
def test_one_batch_mixes_off_lossless_and_lossy(tiny_sedac_engine, lossy_exit):
    llm = LLM(str(tiny_sedac_engine), device="cpu", sedac_lossy_exit=lossy_exit)
    exit_everything(llm.engine)
    always_draft(llm.engine)
    alone = llm.generate(PROMPTS, greedy("off"))
    modes = ["off", "lossless", "lossy", "lossless", "off"]
    mixed = llm.generate(PROMPTS, [greedy(m) for m in modes])
    for mode, a, m in zip(modes, alone, mixed):
        assert len(m.token_ids) == 24
        if mode != "lossy":
            assert m.token_ids == a.token_ids
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_engine_default_mode_and_abort_frees_blocks(tiny_sedac_engine):
    engine = LLMEngine(tiny_sedac_engine, device="cpu", sedac_mode="lossless")
    always_draft(engine)
    for i, p in enumerate(PROMPTS):
        engine.add_request(
            str(i),
            p,
            SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True, sedac_mode="lossy" if i % 2 else None),
        )
    for _ in range(6):
        engine.step()
    assert engine.counters["sedac_drafted_tokens"] > 0
    for i in range(len(PROMPTS)):
        engine.abort_request(str(i))
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    with pytest.raises(ValueError, match="sedac_mode"):
        LLMEngine(tiny_sedac_engine, device="cpu", sedac_mode="fast")


def test_speculation_is_disabled_above_the_batch_size_limit(tiny_sedac_engine):
    llm = LLM(str(tiny_sedac_engine), device="cpu", speculative_disable_by_batch_size=1)
    always_draft(llm.engine)
    off = llm.generate(PROMPTS[:3], greedy("off"))
    batched = llm.generate(PROMPTS[:3], greedy("lossless"))
    assert [o.token_ids for o in batched] == [o.token_ids for o in off]
    assert llm.engine.counters["sedac_drafted_tokens"] == 0  # three at once: plain decodes
    alone = llm.generate(PROMPTS[0], greedy("lossless"))[0]
    assert alone.token_ids == off[0].token_ids and llm.engine.counters["sedac_drafted_tokens"] > 0
    with pytest.raises(ValueError, match="speculative_disable_by_batch_size"):
        LLMEngine(tiny_sedac_engine, device="cpu", speculative_disable_by_batch_size=0)


def test_draft_rounds_run_only_while_they_pay(tiny_sedac_engine):
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    always_draft(llm.engine)
    del llm.engine.sedac._min_drafting  # judged by the costs again
    off = llm.generate(PROMPTS[:3], greedy("off"))
    costs = llm.engine.config.sedac["costs"]
    costs["draft"] = [costs["full"][0] * 2, costs["full"][1] * 2]  # a draft round now costs more than a full pass
    lossless = llm.generate(PROMPTS[:3], greedy("lossless"))
    assert [o.token_ids for o in lossless] == [o.token_ids for o in off]
    assert llm.engine.counters["sedac_drafted_tokens"] == 0


def test_lossless_drafts_right_after_a_prefix_cache_hit(tiny_sedac_engine):
    """A prompt cached up to its last token is admitted as a one-token step and drafts at once, so its
    draft slots are reserved at admission too (more drafts than the rest of its block holds)."""
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    llm.engine.config.sedac["draft_len"] = 6  # blocks hold 4 tokens
    always_draft(llm.engine)
    prompt = list(range(10, 19))  # two full blocks, then one token
    off = llm.generate([prompt], greedy("off"))[0]
    lossless = llm.generate([prompt], greedy("lossless"))[0]
    assert llm.engine.blocks.prefix_hits >= 2 and llm.engine.counters["sedac_drafted_tokens"] > 0
    assert lossless.token_ids == off.token_ids


def test_draft_plan_drafts_less_as_batches_turn_compute_bound():
    costs = {"full": [0.92, 0.08], "draft": [0.33, 0.13]}  # an int8 copy's, as measured on 2 AVX2 cores
    plan = draft_plan(costs, alpha=0.97, max_draft_len=6, max_batch=16)
    assert plan[1] == 6 and plan[16] == 0
    assert all(a >= b for a, b in zip(plan[1:], plan[2:]))  # never more drafts for a bigger batch
    assert draft_plan(costs, alpha=0.2, max_draft_len=6, max_batch=4) == [0, 0, 0, 0, 0]  # drafts rarely accepted
    assert draft_plan({"full": [1.0, 0.0], "draft": [1.0, 0.0]}, 1.0, 6, 2) == [0, 0, 0]  # drafts no cheaper
