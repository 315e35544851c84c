"""SEDAC on a tiny random Llama: lossless == off, lossy exits and fills KV, modes mix in one batch,
aborts free blocks, speculative sampling keeps the distribution, LTT keeps its guarantee."""
import itertools
import json

import pytest
import torch

from sedac import LLM, SamplingParams
from sedac.builder import calibration as cal
from sedac.builder.exit_training import teacher_pass
from sedac.runtime.early_exit import ExitController, int8_exit_pays
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
    engine.sedac._min_drafting = lambda num_seqs: 0.0     # a tiny model's int8 pass may cost as much as a full one


def _greedy(mode, **kw):
    return SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, sedac_mode=mode, **kw)


def _prefill_share(costs, outs) -> float:
    """A token's share of the one prefill pass that computed every prompt of outs (their first tokens)."""
    rows = sum(len(o.prompt_token_ids) for o in outs)
    return pass_cost(costs, "full", rows) / rows


def _exit_everything(engine: LLMEngine):
    """Thresholds no token misses, so the lossy path (exit + KV propagation) runs on every decode."""
    engine.sedac.exit_controller.levels = [(a, [1e9] * len(t)) for a, t in engine.sedac.exit_controller.levels]
    engine.sedac.exit_controller.audit_every = 10 ** 9


def test_engine_holds_trained_exits(tiny_sedac_engine):
    cfg = json.loads((tiny_sedac_engine / "config.json").read_text())["sedac"]
    assert cfg["exit_layers"] == [1, 2] and cfg["draft_len"] >= 1 and 0 <= cfg["draft_agreement"] <= 1
    assert all(len(cfg["costs"][p]) == 2 and cfg["costs"][p][1] > 0 for p in ("full", "int8"))   # measured
    assert set(cfg["thresholds"]) == set(cfg["int8_thresholds"]) == {str(a) for a in cal.AGREEMENT_LEVELS}
    assert cfg["lossy_exit"] in ("int8", "depth") and 0 <= cfg["int8_exit_fraction"]["0.99"] <= 1
    calibration = json.loads((tiny_sedac_engine / "sedac_calibration.json").read_text())
    for curves in (calibration["curves"], calibration["int8_curves"]):
        assert curves["0.99"] and all("agreement" in point for point in curves["0.99"])
    assert (tiny_sedac_engine / "sedac.safetensors").is_file()


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3, "bad_words": ["the"]}, {"logprobs": 2}])
def test_lossless_greedy_is_token_identical_to_off(llm, extra):
    off = llm.generate(PROMPTS, _greedy("off", **extra))
    lossless = llm.generate(PROMPTS, _greedy("lossless", **extra))
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
    assert ([(o.text, o.token_ids, o.finish_reason) for o in lossless]
            == [(o.text, o.token_ids, o.finish_reason) for o in off])
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
    params = [SamplingParams(max_tokens=SPEC_TOKENS, temperature=1.0, top_k=4, seed=s, ignore_eos=True,
                             sedac_mode=mode) for s in range(SPEC_SAMPLES)]
    return llm.generate([PROMPTS[1]] * SPEC_SAMPLES, params)


def test_lossless_sampling_keeps_the_distribution(tiny_sedac_engine, monkeypatch):
    """Speculative sampling with drafts really made, from a deliberately poor drafter (int8 head rows
    rescaled), must still sample the full model's distribution: at each drafted position, a chi-square
    test of lossless vs off (800 samples each) keeps p > 0.001. The same test rejects a broken acceptance
    rule (always accept the draft), so it can fail."""
    from sedac.runtime import speculative
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    always_draft(llm.engine)
    scale = llm.engine.runner.model.lm_head.int8[1]
    scale[::2] *= 3.0                                   # the drafter now prefers even token ids
    off = _sampled_tokens(llm, "off")
    lossless = _sampled_tokens(llm, "lossless")
    acceptance = [o.metrics.acceptance_rate for o in lossless if o.metrics.acceptance_rate is not None]
    assert len(acceptance) == SPEC_SAMPLES                     # every request drafted
    assert 0.05 < sum(acceptance) / len(acceptance) < 0.95     # and some drafts were rejected
    for pos in range(1, SPEC_TOKENS):
        p = _chi2_homogeneity_p([o.token_ids[pos] for o in off], [o.token_ids[pos] for o in lossless])
        assert p > SPEC_ALPHA, (pos, p)

    def accept_every_draft(logits, views, drafts, qs, constrain):
        probs = speculative.filtered_probs(speculative.process(logits, views), [v.params for v in views])
        tokens = list(drafts) + [speculative.draw(probs[len(drafts)], views[0].generator)]
        return tokens, speculative.token_logprobs(None, tokens, views[:len(tokens)])
    monkeypatch.setattr(speculative, "_accept_sampled", accept_every_draft)
    broken = _sampled_tokens(llm, "lossless")
    assert min(_chi2_homogeneity_p([o.token_ids[pos] for o in off], [o.token_ids[pos] for o in broken])
               for pos in range(1, SPEC_TOKENS)) < SPEC_ALPHA


def test_lossy_exits_fill_kv_and_report_skips(tiny_sedac_engine):
    llm = LLM(str(tiny_sedac_engine), device="cpu", sedac_lossy_exit="depth")
    _exit_everything(llm.engine)
    outs = llm.generate(PROMPTS, _greedy("lossy"))
    first_exit = llm.engine.config.sedac["lossy_layers"][0]
    for o in outs:
        assert len(o.token_ids) == 24
        assert o.metrics.layers_per_token < llm.engine.config.model.num_layers
        assert o.metrics.skip_ratio > 0
    assert llm.engine.stats()["sedac_exit_layer_tokens"][first_exit] >= 5 * 23
    # the exited tokens are the exit head's argmax (greedy over its kept vocabulary)
    assert all(t in set(llm.engine.runner.exit_heads[first_exit].vocab_ids.tolist()) for t in outs[0].token_ids[1:])
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@pytest.mark.parametrize("kv_fill", ["deferred", "propagate", "ghost"])
def test_deferred_fill_keeps_the_kv_cache_exact(tiny_sedac_engine, kv_fill):
    """Every token is an exit candidate and every other one is audited (runs the full model). With
    the deferred fill the cache is exactly the full model's, so each audited token is the full model's
    greedy choice on the lossy output's own prefix; propagation and Ghost KV only approximate it."""
    llm = LLM(str(tiny_sedac_engine), device="cpu", sedac_kv_fill=kv_fill, sedac_lossy_exit="depth")
    _exit_everything(llm.engine)
    llm.engine.sedac.exit_controller.audit_every = 2
    model = llm.engine.runner.model
    mismatches = 0
    for prompt in PROMPTS[:4]:                  # multi-token prompts: the first token comes from the prefill
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        llm.engine.sedac.exit_controller._exits = 0   # decode steps 2, 4, ... are the audited ones
        out = llm.generate([ids], _greedy("lossy"))[0].token_ids
        _, final = teacher_pass(model, ids + out, [])
        best = model.logits(final[len(ids) - 1:-1]).argmax(-1).tolist()
        assert best[0] == out[0]                                   # the prefill's token
        mismatches += sum(best[s] != out[s] for s in range(2, len(out), 2))   # audited decode steps
    assert (mismatches == 0) if kv_fill == "deferred" else (mismatches > 0)


def test_ghost_kv_fills_the_deeper_cache_closer_than_state_propagation(tiny_sedac_engine):
    """Exit states of held-out text written through the runtime's fill path: the build's Ghost KV
    predictor lands nearer the true deeper K/V than CALM's propagation (both exact at the exit layer,
    whose input is the exit state itself)."""
    from sedac.runtime.early_exit import _predict_kv
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    runner, model = llm.engine.runner, llm.engine.runner.model
    exit_layer, num_layers = llm.engine.config.sedac["lossy_layers"][0], llm.engine.config.model.num_layers
    text = "Zebras graze at dawn while the river hums an old tune to itself."
    deeper = list(range(exit_layer, num_layers))
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    states, _ = teacher_pass(model, ids, deeper)
    positions = slots = torch.arange(len(ids))
    cos, signed_sin = model.rotary.tables(positions, torch.float32)
    def deeper_cache():
        return [torch.cat([model.layers[l].k_cache[slots], model.layers[l].v_cache[slots]]) for l in deeper]
    for l in deeper:                             # the truth: each layer's K/V of its real input
        block = model.layers[l]
        block.write_kv(block.kv_projection(block.input_norm(states[l])), cos, signed_sin, slots)
    truth = deeper_cache()
    errors = {}
    for fill in ("propagate", "ghost"):
        _predict_kv(runner, states[exit_layer], positions, slots, exit_layer, fill)
        errors[fill] = [float((a - b).norm() / b.norm()) for a, b in zip(deeper_cache(), truth)]
        assert errors[fill][0] < 1e-5
    assert sum(errors["ghost"][1:]) < sum(errors["propagate"][1:]), errors
    report = llm.engine.config.sedac["ghost_kv_error"]           # the build's own held-out measurement
    assert report["ghost"] < report["propagate"]


def test_ghost_fill_needs_a_ghost_predictor(tiny_llama, tiny_sedac_engine):
    with pytest.raises(ValueError, match="Ghost KV"):
        LLMEngine(tiny_llama, device="cpu", sedac_kv_fill="ghost")
    with pytest.raises(ValueError, match="sedac_kv_fill"):
        LLMEngine(tiny_sedac_engine, device="cpu", sedac_kv_fill="fast")


@pytest.mark.parametrize("lossy_exit", ["int8", "depth"])
def test_lossy_at_unreachable_agreement_is_the_full_model(tiny_sedac_engine, lossy_exit):
    llm = LLM(str(tiny_sedac_engine), device="cpu", sedac_lossy_exit=lossy_exit)
    off = llm.generate(PROMPTS, _greedy("off"))
    strict = llm.generate(PROMPTS, _greedy("lossy", sedac_agreement=1.0))
    assert [o.token_ids for o in strict] == [o.token_ids for o in off]


def _int8_llm(engine_dir, audit_every: int) -> LLM:
    """An int8-exit engine where every token may exit and every audit_every-th exit is audited, at
    any batch size."""
    llm = LLM(str(engine_dir), device="cpu", sedac_lossy_exit="int8")
    _exit_everything(llm.engine)
    llm.engine.sedac.exit_controller.audit_every = audit_every
    llm.engine.sedac.int8_exit_pays = lambda num_seqs: True
    return llm


def test_int8_exit_keeps_the_int8_token_and_reports_skips(tiny_sedac_engine):
    llm = _int8_llm(tiny_sedac_engine, audit_every=10 ** 9)
    outs = llm.generate(PROMPTS[:4], _greedy("lossy"))     # multi-token prompts: the prefill makes token 1
    num_layers, costs = llm.engine.config.model.num_layers, llm.engine.config.sedac["costs"]
    int8, full = pass_cost(costs, "int8", 4) / 4, pass_cost(costs, "full", 4) / 4      # a row's share at batch 4
    first = _prefill_share(costs, outs)
    for o in outs:       # the 23 others ran an int8 pass each and no full-precision layer (token 1: the prefill's)
        assert len(o.token_ids) == 24
        assert o.metrics.layers_per_token == pytest.approx(num_layers * (23 * int8 + first) / (23 * full + first))
    assert llm.engine.stats()["sedac_exit_layer_tokens"] == {0: 4 * 23}
    # engine-wide, as each request: the prefill's tokens count in a SEDAC request's cost too
    assert llm.engine.stats()["sedac_skip_ratio"] == pytest.approx(1 - (23 * int8 + first) / (23 * full + first))
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@pytest.mark.parametrize("max_entropy", [1e9, 0.0])
def test_lossless_cost_counts_every_draft_pass(tiny_sedac_engine, monkeypatch, max_entropy):
    """Batch 1: the request's cost is each cycle's int8 passes, their drafts kept or not (max_entropy 0: every
    pass runs and no draft is confident enough to keep, so lossless spends more than off), and its verify
    pass, priced by the build's costs; the engine-wide ratio agrees with the request's."""
    from sedac.runtime import sedac_steps
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    always_draft(llm.engine)
    llm.engine.config.sedac["draft_max_entropy"] = max_entropy
    cycles = []
    step = sedac_steps.speculative_step
    monkeypatch.setattr(sedac_steps, "speculative_step", lambda *a, **k: cycles.extend(r := step(*a, **k)) or r)
    out = llm.generate([PROMPTS[0]], _greedy("lossless"))[0]
    costs = llm.engine.config.sedac["costs"]
    assert cycles and any(c.draft_passes for c in cycles)
    first = _prefill_share(costs, [out])                             # the prefill's token, as off pays it
    spent = first + sum(len(c.draft_passes) * pass_cost(costs, "int8", 1) + pass_cost(costs, "full", c.drafted + 1)
                        for c in cycles)
    assert out.metrics.skip_ratio == pytest.approx(1 - spent / (first + 23))
    assert llm.engine.stats()["sedac_skip_ratio"] == pytest.approx(out.metrics.skip_ratio)
    if max_entropy == 0.0:
        assert not any(c.drafted for c in cycles) and out.metrics.skip_ratio < 0


def test_int8_exits_are_rewritten_and_audited_by_the_next_full_pass(tiny_sedac_engine, monkeypatch):
    """Decode steps alternate exit / stay. Each stay's full pass reruns the exits before it as extra
    rows, so the K/V it reads is exactly the full model's: every stay's token is the full model's
    greedy choice on the lossy output's own prefix, and (audit_every=1) every exit but the last is audited."""
    from sedac.runtime import early_exit
    llm = _int8_llm(tiny_sedac_engine, audit_every=1)
    flips = itertools.cycle([1e9, -1.0])
    monkeypatch.setattr(early_exit, "_taus", lambda c, levels, device: torch.tensor([next(flips) for _ in levels]))
    ids = llm.tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    out = llm.generate([ids], _greedy("lossy"))[0]         # 23 decode steps: 12 exits, 11 stays
    assert llm.engine.stats()["sedac_exit_layer_tokens"] == {0: 12}
    assert len(llm.engine.sedac.exit_controller.audits[0.99]) == 11
    # cost, batch-1 full passes: the prefill's token 1, an int8 pass per step, a 2-row full pass per stay
    costs = llm.engine.config.sedac["costs"]
    first = _prefill_share(costs, [out])
    spent = first + 23 * pass_cost(costs, "int8", 1) + 11 * pass_cost(costs, "full", 2)
    assert out.metrics.layers_per_token == pytest.approx(llm.engine.config.model.num_layers * spent / (first + 23))
    assert out.metrics.skip_ratio == pytest.approx(1 - spent / (first + 23))
    model = llm.engine.runner.model
    _, final = teacher_pass(model, ids + out.token_ids, [])
    best = model.logits(final[len(ids) - 1:-1]).argmax(-1).tolist()
    assert [best[j] for j in range(2, 24, 2)] == [out.token_ids[j] for j in range(2, 24, 2)]


def test_int8_exits_never_enter_the_prefix_cache(tiny_sedac_engine):
    """Blocks holding int8-exit K/V are not published, so an `off` request on the same text (a chat's
    next turn) recomputes them exactly: its output is what a fresh engine gives."""
    llm = _int8_llm(tiny_sedac_engine, audit_every=10 ** 9)
    ids = llm.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    lossy = llm.generate([ids], _greedy("lossy"))[0].token_ids
    follow = llm.generate([ids + lossy], _greedy("off"))[0]
    assert follow.metrics.num_cached_tokens <= len(ids)
    fresh = LLM(str(tiny_sedac_engine), device="cpu").generate([ids + lossy], _greedy("off"))[0]
    assert follow.token_ids == fresh.token_ids


def test_int8_exit_runs_only_where_it_pays(tiny_sedac_engine):
    costs = {"full": [0.9, 0.1], "int8": [0.36, 0.12]}      # SmolLM2 on 2 CPU cores
    assert int8_exit_pays(costs, 0.95, 1) and not int8_exit_pays(costs, 0.95, 16)
    assert not int8_exit_pays(costs, 0.3, 1)
    llm = LLM(str(tiny_sedac_engine), device="cpu", sedac_lossy_exit="int8")
    _exit_everything(llm.engine)
    llm.engine.sedac.int8_exit_pays = lambda num_seqs: False
    off = llm.generate(PROMPTS, _greedy("off"))
    assert [o.token_ids for o in llm.generate(PROMPTS, _greedy("lossy"))] == [o.token_ids for o in off]
    assert llm.engine.stats()["sedac_exit_layer_tokens"] == {0: 0}
    with pytest.raises(ValueError, match="sedac_lossy_exit"):
        LLMEngine(tiny_sedac_engine, device="cpu", sedac_lossy_exit="fast")


@pytest.mark.parametrize("lossy_exit", ["int8", "depth"])
def test_one_batch_mixes_off_lossless_and_lossy(tiny_sedac_engine, lossy_exit):
    llm = LLM(str(tiny_sedac_engine), device="cpu", sedac_lossy_exit=lossy_exit)
    _exit_everything(llm.engine)
    always_draft(llm.engine)
    alone = llm.generate(PROMPTS, _greedy("off"))
    modes = ["off", "lossless", "lossy", "lossless", "off"]
    mixed = llm.generate(PROMPTS, [_greedy(m) for m in modes])
    for mode, a, m in zip(modes, alone, mixed):
        assert len(m.token_ids) == 24
        if mode != "lossy":
            assert m.token_ids == a.token_ids
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_engine_default_mode_and_abort_frees_blocks(tiny_sedac_engine):
    engine = LLMEngine(tiny_sedac_engine, device="cpu", sedac_mode="lossless")
    always_draft(engine)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True,
                                                     sedac_mode="lossy" if i % 2 else None))
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
    off = llm.generate(PROMPTS[:3], _greedy("off"))
    batched = llm.generate(PROMPTS[:3], _greedy("lossless"))
    assert [o.token_ids for o in batched] == [o.token_ids for o in off]
    assert llm.engine.counters["sedac_drafted_tokens"] == 0              # three at once: plain decodes
    alone = llm.generate(PROMPTS[0], _greedy("lossless"))[0]
    assert alone.token_ids == off[0].token_ids and llm.engine.counters["sedac_drafted_tokens"] > 0
    with pytest.raises(ValueError, match="speculative_disable_by_batch_size"):
        LLMEngine(tiny_sedac_engine, device="cpu", speculative_disable_by_batch_size=0)


def test_draft_rounds_run_only_while_they_pay(tiny_sedac_engine):
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    always_draft(llm.engine)
    del llm.engine.sedac._min_drafting                                 # judged by the costs again
    off = llm.generate(PROMPTS[:3], _greedy("off"))
    costs = llm.engine.config.sedac["costs"]
    costs["int8"] = [costs["full"][0] * 2, costs["full"][1] * 2]      # a draft round now costs more than a full pass
    lossless = llm.generate(PROMPTS[:3], _greedy("lossless"))
    assert [o.token_ids for o in lossless] == [o.token_ids for o in off]
    assert llm.engine.counters["sedac_drafted_tokens"] == 0


@pytest.mark.parametrize("exit_fraction", [0.95, 0.3])
def test_controller_judges_audits_against_the_exits_share_of_the_budget(exit_fraction):
    """At level 0.99 exits may err at 1% / exit fraction. Audits erring at 0.9x that keep the
    calibrated thresholds (bar a rare false alarm, relaxed back); at 3x they tighten them."""
    def mean_scale(error_rate):
        controller, scales = ExitController({"0.99": [1.0]}, 0.99, audit_every=1, window=256), []
        gen = torch.Generator().manual_seed(0)
        for _ in range(8000):
            exits = torch.rand((), generator=gen).item() < exit_fraction
            if controller.should_audit(0.99, exits):
                controller.record(0.99, torch.rand((), generator=gen).item() >= error_rate)
                scales.append(controller.scale[0.99])
        return sum(scales) / len(scales)
    allowed = 0.01 / exit_fraction
    assert mean_scale(0.9 * allowed) > 0.97
    assert mean_scale(3 * allowed) < 0.8


def test_learn_then_test_guarantee_holds_on_held_out_data():
    """Synthetic exits whose error probability grows with entropy: thresholds chosen on one sample
    keep the disagreement under delta on a fresh, larger sample, at every level."""
    g = torch.Generator().manual_seed(0)
    def draw(n):
        entropy = [torch.rand(n, generator=g) * 4 for _ in range(2)]
        agree = [torch.rand(n, generator=g) > (h / 4) ** 2 * s for h, s in zip(entropy, (0.8, 0.4))]
        return entropy, agree
    calib, held_out = draw(20000), draw(200000)
    learn = cal.document_split(torch.arange(20000) // 100)        # 200 documents of 100 tokens
    for level in (0.9, 0.95, 0.99):
        ltt = cal.learn_then_test(*calib, delta=1 - level, learn=learn)
        where, wrong = cal.cascade(ltt["thresholds"], *held_out)
        assert 1 - wrong.float().mean().item() >= level
        assert (where >= 0).float().mean() > 0.05            # and it does exit tokens
    assert cal.binomial_cdf(5, 10, 0.5) == pytest.approx(0.623046875)
    assert cal.binomial_cdf(-1, 10, 0.5) == 0.0          # zero errors: P(X >= 0) = 1, no crash


def test_calibration_splits_by_document_and_choices_never_read_the_test_half():
    """Each document's tokens fall in one half (an interleaved token split put every document in both),
    and what the build chooses (exit layer, int8 vs depth exit, thresholds per t) is the same whatever
    the test half holds: flipping every test-half label changes only the test's p-values."""
    from sedac.builder.sedac_build import _calibrate_int8_exit, _choose_lossy
    g = torch.Generator().manual_seed(1)
    documents = torch.repeat_interleave(torch.arange(40), torch.randint(20, 80, (40,), generator=g))
    learn = cal.document_split(documents)
    assert not set(documents[learn].tolist()) & set(documents[~learn].tolist())
    assert 0.3 < learn.float().mean() < 0.7
    n, layers = len(documents), [4, 8]
    entropy = {layer: torch.rand(n, generator=g) * 4 for layer in layers}
    agree = {layer: torch.rand(n, generator=g) > (entropy[layer] / 4) ** 2 * s for layer, s in zip(layers, (0.6, 0.2))}
    costs = {"layers": 12, "lm_head": 2.0, "exit_head": 0.3, "kv_fill": 0.2, "full": [0.9, 0.1], "int8": [0.3, 0.1]}
    flipped = {layer: torch.where(learn, a, ~a) for layer, a in agree.items()}
    assert _choose_lossy(layers, entropy, agree, costs, documents, learn) == \
        _choose_lossy(layers, entropy, flipped, costs, documents, learn)
    runs = [_calibrate_int8_exit(entropy[8], a[8], costs, 0.5, documents, learn) for a in (agree, flipped)]
    assert runs[0]["lossy_exit"] == runs[1]["lossy_exit"]
    assert runs[0]["predicted_int8_lossy_cost_at_0.99"] == runs[1]["predicted_int8_lossy_cost_at_0.99"]
    curves = [r["int8_curves"]["0.9"] for r in runs]
    k = min(len(curves[0]), len(curves[1]))                          # the test decides where t stops,
    assert [c["thresholds"] for c in curves[0][:k]] == [c["thresholds"] for c in curves[1][:k]]   # not the map
    assert curves[0][0]["p_value"] != curves[1][0]["p_value"]         # the test half is what was tested


def test_lossless_drafts_right_after_a_prefix_cache_hit(tiny_sedac_engine):
    """A prompt cached up to its last token is admitted as a one-token step and drafts at once, so its
    draft slots are reserved at admission too (more drafts than the rest of its block holds)."""
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    llm.engine.config.sedac["draft_len"] = 6                  # blocks hold 4 tokens
    always_draft(llm.engine)
    prompt = list(range(10, 19))                              # two full blocks, then one token
    off = llm.generate([prompt], _greedy("off"))[0]
    lossless = llm.generate([prompt], _greedy("lossless"))[0]
    assert llm.engine.blocks.prefix_hits >= 2 and llm.engine.counters["sedac_drafted_tokens"] > 0
    assert lossless.token_ids == off.token_ids


def test_draft_plan_drafts_less_as_batches_turn_compute_bound():
    costs = {"full": [0.92, 0.08], "int8": [0.33, 0.13]}     # as measured on 2 AVX2 cores
    plan = draft_plan(costs, alpha=0.97, max_draft_len=6, max_batch=16)
    assert plan[1] == 6 and plan[16] == 0
    assert all(a >= b for a, b in zip(plan[1:], plan[2:]))                 # never more drafts for a bigger batch
    assert draft_plan(costs, alpha=0.2, max_draft_len=6, max_batch=4) == [0, 0, 0, 0, 0]   # drafts rarely accepted
    assert draft_plan({"full": [1.0, 0.0], "int8": [1.0, 0.0]}, 1.0, 6, 2) == [0, 0, 0]  # int8 no cheaper
