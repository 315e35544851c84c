"""SEDAC lossy mode on a tiny random Llama: exits fill KV (deferred, propagated, Ghost KV), the precision exit is
rewritten and audited by the next full pass and stays out of the prefix cache, the controller judges audits,
and Learn-then-Test calibration keeps its guarantee on held-out data."""

import itertools

import pytest
import torch

from sedac import LLM
from sedac.builder import calibration as cal
from sedac.builder.exit_training import teacher_pass
from sedac.runtime.early_exit import ExitController, precision_exit_pays
from sedac.runtime.engine import LLMEngine
from sedac.runtime.speculative import pass_cost
from tests.test_sedac import PROMPTS, exit_everything, greedy, prefill_share


def _precision_exit_llm(engine_dir, audit_every: int) -> LLM:
    """A precision-exit engine where every token may exit and every audit_every-th exit is audited, at
    any batch size."""
    llm = LLM(str(engine_dir), device="cpu", sedac_lossy_exit="precision")
    exit_everything(llm.engine)
    llm.engine.sedac.exit_controller.audit_every = audit_every
    llm.engine.sedac.precision_exit_pays = lambda num_seqs: True
    return llm


def test_lossy_exits_fill_kv_and_report_skips(tiny_sedac_engine):
    llm = LLM(str(tiny_sedac_engine), device="cpu", sedac_lossy_exit="depth")
    exit_everything(llm.engine)
    outs = llm.generate(PROMPTS, greedy("lossy"))
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
    exit_everything(llm.engine)
    llm.engine.sedac.exit_controller.audit_every = 2
    model = llm.engine.runner.model
    mismatches = 0
    for prompt in PROMPTS[:4]:  # multi-token prompts: the first token comes from the prefill
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        llm.engine.sedac.exit_controller._exits = 0  # decode steps 2, 4, ... are the audited ones
        out = llm.generate([ids], greedy("lossy"))[0].token_ids
        _, final = teacher_pass(model, ids + out, [])
        best = model.logits(final[len(ids) - 1 : -1]).argmax(-1).tolist()
        assert best[0] == out[0]  # the prefill's token
        mismatches += sum(best[s] != out[s] for s in range(2, len(out), 2))  # audited decode steps
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

    for l in deeper:  # the truth: each layer's K/V of its real input
        block = model.layers[l]
        block.write_kv(block.kv_projection(block.input_norm(states[l])), cos, signed_sin, slots)
    truth = deeper_cache()
    errors = {}
    for fill in ("propagate", "ghost"):
        _predict_kv(runner, states[exit_layer], positions, slots, exit_layer, fill)
        errors[fill] = [float((a - b).norm() / b.norm()) for a, b in zip(deeper_cache(), truth)]
        assert errors[fill][0] < 1e-5
    assert sum(errors["ghost"][1:]) < sum(errors["propagate"][1:]), errors
    report = llm.engine.config.sedac["ghost_kv_error"]  # the build's own held-out measurement
    assert report["ghost"] < report["propagate"]


def test_ghost_fill_needs_a_ghost_predictor(tiny_llama, tiny_sedac_engine):
    with pytest.raises(ValueError, match="Ghost KV"):
        LLMEngine(tiny_llama, device="cpu", sedac_kv_fill="ghost")
    with pytest.raises(ValueError, match="sedac_kv_fill"):
        LLMEngine(tiny_sedac_engine, device="cpu", sedac_kv_fill="fast")


@pytest.mark.parametrize("lossy_exit", ["precision", "depth"])
def test_lossy_at_unreachable_agreement_is_the_full_model(tiny_sedac_engine, lossy_exit):
    llm = LLM(str(tiny_sedac_engine), device="cpu", sedac_lossy_exit=lossy_exit)
    off = llm.generate(PROMPTS, greedy("off"))
    strict = llm.generate(PROMPTS, greedy("lossy", sedac_agreement=1.0))
    assert [o.token_ids for o in strict] == [o.token_ids for o in off]


def test_precision_exit_keeps_the_draft_token_and_reports_skips(tiny_sedac_engine):
    llm = _precision_exit_llm(tiny_sedac_engine, audit_every=10**9)
    outs = llm.generate(PROMPTS[:4], greedy("lossy"))  # multi-token prompts: the prefill makes token 1
    num_layers, costs = llm.engine.config.model.num_layers, llm.engine.config.sedac["costs"]
    draft, full = pass_cost(costs, "draft", 4) / 4, pass_cost(costs, "full", 4) / 4  # a row's share at batch 4
    first = prefill_share(costs, outs)
    for o in outs:  # the 23 others ran a draft pass each and no full-precision layer (token 1: the prefill's)
        assert len(o.token_ids) == 24
        assert o.metrics.layers_per_token == pytest.approx(num_layers * (23 * draft + first) / (23 * full + first))
    assert llm.engine.stats()["sedac_exit_layer_tokens"] == {0: 4 * 23}
    # engine-wide, as each request: the prefill's tokens count in a SEDAC request's cost too
    assert llm.engine.stats()["sedac_skip_ratio"] == pytest.approx(1 - (23 * draft + first) / (23 * full + first))
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_precision_exits_are_rewritten_and_audited_by_the_next_full_pass(tiny_sedac_engine, monkeypatch):
    """Decode steps alternate exit / stay. Each stay's full pass reruns the exits before it as extra
    rows, so the K/V it reads is exactly the full model's: every stay's token is the full model's
    greedy choice on the lossy output's own prefix, and (audit_every=1) every exit but the last is audited."""
    from sedac.runtime import early_exit

    llm = _precision_exit_llm(tiny_sedac_engine, audit_every=1)
    flips = itertools.cycle([1e9, -1.0])
    monkeypatch.setattr(early_exit, "_taus", lambda c, levels, device: torch.tensor([next(flips) for _ in levels]))
    ids = llm.tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    out = llm.generate([ids], greedy("lossy"))[0]  # 23 decode steps: 12 exits, 11 stays
    assert llm.engine.stats()["sedac_exit_layer_tokens"] == {0: 12}
    assert len(llm.engine.sedac.exit_controller.audits[0.99]) == 11
    # cost, batch-1 full passes: the prefill's token 1, a draft pass per step, a 2-row full pass per stay
    costs = llm.engine.config.sedac["costs"]
    first = prefill_share(costs, [out])
    spent = first + 23 * pass_cost(costs, "draft", 1) + 11 * pass_cost(costs, "full", 2)
    assert out.metrics.layers_per_token == pytest.approx(llm.engine.config.model.num_layers * spent / (first + 23))
    assert out.metrics.skip_ratio == pytest.approx(1 - spent / (first + 23))
    model = llm.engine.runner.model
    _, final = teacher_pass(model, ids + out.token_ids, [])
    best = model.logits(final[len(ids) - 1 : -1]).argmax(-1).tolist()
    assert [best[j] for j in range(2, 24, 2)] == [out.token_ids[j] for j in range(2, 24, 2)]


def test_precision_exits_never_enter_the_prefix_cache(tiny_sedac_engine):
    """Blocks holding precision-exit K/V are not published, so an `off` request on the same text (a chat's
    next turn) recomputes them exactly: its output is what a fresh engine gives."""
    llm = _precision_exit_llm(tiny_sedac_engine, audit_every=10**9)
    ids = llm.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    lossy = llm.generate([ids], greedy("lossy"))[0].token_ids
    follow = llm.generate([ids + lossy], greedy("off"))[0]
    assert follow.metrics.num_cached_tokens <= len(ids)
    fresh = LLM(str(tiny_sedac_engine), device="cpu").generate([ids + lossy], greedy("off"))[0]
    assert follow.token_ids == fresh.token_ids


def test_precision_exit_runs_only_where_it_pays(tiny_sedac_engine):
    costs = {"full": [0.9, 0.1], "draft": [0.36, 0.12]}  # SmolLM2 on 2 CPU cores
    assert precision_exit_pays(costs, 0.95, 1) and not precision_exit_pays(costs, 0.95, 16)
    assert not precision_exit_pays(costs, 0.3, 1)
    llm = LLM(str(tiny_sedac_engine), device="cpu", sedac_lossy_exit="precision")
    exit_everything(llm.engine)
    llm.engine.sedac.precision_exit_pays = lambda num_seqs: False
    off = llm.generate(PROMPTS, greedy("off"))
    assert [o.token_ids for o in llm.generate(PROMPTS, greedy("lossy"))] == [o.token_ids for o in off]
    assert llm.engine.stats()["sedac_exit_layer_tokens"] == {0: 0}
    with pytest.raises(ValueError, match="sedac_lossy_exit"):
        LLMEngine(tiny_sedac_engine, device="cpu", sedac_lossy_exit="fast")


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
    learn = cal.document_split(torch.arange(20000) // 100)  # 200 documents of 100 tokens
    for level in (0.9, 0.95, 0.99):
        ltt = cal.learn_then_test(*calib, delta=1 - level, learn=learn)
        where, wrong = cal.cascade(ltt["thresholds"], *held_out)
        assert 1 - wrong.float().mean().item() >= level
        assert (where >= 0).float().mean() > 0.05  # and it does exit tokens
    assert cal.binomial_cdf(5, 10, 0.5) == pytest.approx(0.623046875)
    assert cal.binomial_cdf(-1, 10, 0.5) == 0.0  # zero errors: P(X >= 0) = 1, no crash


def test_calibration_splits_by_document_and_choices_never_read_the_test_half():
    """Each document's tokens fall in one half (an interleaved token split put every document in both),
    and what the build chooses (exit layer, precision vs depth exit, thresholds per t) is the same whatever
    the test half holds: flipping every test-half label changes only the test's p-values."""
    from sedac.builder.sedac_build import _calibrate_precision_exit, _choose_lossy

    g = torch.Generator().manual_seed(1)
    documents = torch.repeat_interleave(torch.arange(40), torch.randint(20, 80, (40,), generator=g))
    learn = cal.document_split(documents)
    assert not set(documents[learn].tolist()) & set(documents[~learn].tolist())
    assert 0.3 < learn.float().mean() < 0.7
    n, layers = len(documents), [4, 8]
    entropy = {layer: torch.rand(n, generator=g) * 4 for layer in layers}
    agree = {layer: torch.rand(n, generator=g) > (entropy[layer] / 4) ** 2 * s for layer, s in zip(layers, (0.6, 0.2))}
    costs = {"layers": 12, "lm_head": 2.0, "exit_head": 0.3, "kv_fill": 0.2, "full": [0.9, 0.1], "draft": [0.3, 0.1]}
    flipped = {layer: torch.where(learn, a, ~a) for layer, a in agree.items()}
    assert _choose_lossy(layers, entropy, agree, costs, documents, learn) == _choose_lossy(
        layers, entropy, flipped, costs, documents, learn
    )
    runs = [_calibrate_precision_exit(entropy[8], a[8], costs, 0.5, documents, learn) for a in (agree, flipped)]
    assert runs[0]["lossy_exit"] == runs[1]["lossy_exit"]
    assert runs[0]["predicted_precision_lossy_cost_at_0.99"] == runs[1]["predicted_precision_lossy_cost_at_0.99"]
    curves = [r["precision_curves"]["0.9"] for r in runs]
    k = min(len(curves[0]), len(curves[1]))  # the test decides where t stops,
    assert [c["thresholds"] for c in curves[0][:k]] == [c["thresholds"] for c in curves[1][:k]]  # not the map
    assert curves[0][0]["p_value"] != curves[1][0]["p_value"]  # the test half is what was tested
