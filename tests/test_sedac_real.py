"""SEDAC on the real SmolLM2 engine (built with --sedac once per session), on held-out prompts."""

import pytest
import torch

from sedac import LLM, SamplingParams
from sedac.builder import calibration as cal
from sedac.builder import exit_training as et
from sedac.builder.datasets import sharegpt_prompts
from sedac.runtime.early_exit import ExitController

# The first test here also builds the default --sedac engine (~15 min on 2 cores, up to the issue's
# 30-minute budget); pytest-timeout counts fixture setup, so the project-wide 900 s would cut it off.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def llm(real_sedac_engine):
    return LLM(str(real_sedac_engine), device="cpu")


@pytest.fixture(scope="module")
def prompts(llm):
    return sharegpt_prompts(llm.tokenizer, "bench", 8, 200)


def test_lossless_is_token_identical_to_off(llm, prompts):
    off = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0))
    lossless = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0, sedac_mode="lossless"))
    assert [o.token_ids for o in lossless] == [o.token_ids for o in off]
    alone = llm.generate(prompts[:1], SamplingParams(max_tokens=48, temperature=0.0, sedac_mode="lossless"))
    assert alone[0].token_ids == off[0].token_ids
    assert alone[0].metrics.acceptance_rate is not None  # it drafted (in the batch of 8 few rounds pay)


def test_structured_outputs_in_lossless_are_token_identical_to_off(llm, prompts):
    """A JSON schema per request: drafts and verification both follow the grammar, so each constrained
    greedy output is the one `off` gives, and drafts were made and accepted."""
    schema = {
        "type": "object",
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    for prompt in prompts[:4]:
        params = [
            SamplingParams(max_tokens=64, temperature=0.0, sedac_mode=mode, structured_outputs={"json": schema})
            for mode in ("off", "lossless")
        ]
        off, lossless = (llm.generate([prompt], p)[0] for p in params)
        assert lossless.token_ids == off.token_ids
        assert lossless.metrics.acceptance_rate is not None and lossless.metrics.acceptance_rate > 0


def test_calibration_guarantee_holds_on_held_out_answers(llm, prompts):
    """Depth-exit thresholds calibrated on the calib split keep exit agreement >= 0.99 on the bench split's own
    greedy answers (teacher-forced, exactly what calibration measured on its split)."""
    engine = llm.engine
    layers = engine.config.sedac["lossy_layers"]
    answers = llm.generate(prompts, SamplingParams(max_tokens=96, temperature=0.0))
    docs = [(p + list(o.token_ids), len(p) - 1) for p, o in zip(prompts, answers)]
    feats = et.collect_features(engine.runner.model, docs, layers, 10**6, "held-out")
    entropy, agree = zip(
        *(et.evaluate_exit_head(engine.runner.exit_heads[l], feats.hidden[l], feats.argmax) for l in layers)
    )
    thresholds = ExitController(engine.config.sedac["thresholds"], 0.99).thresholds(0.99, len(layers))
    where, wrong = cal.cascade(thresholds, list(entropy), list(agree))
    assert 1 - wrong.float().mean().item() >= 0.99
    assert len(wrong) > 500


def test_precision_exit_calibration_holds_on_held_out_answers(llm, prompts):
    """The precision exit's thresholds (calibrated on the calib split) on the bench split's own greedy
    answers, teacher-forced as calibration measured them: the observed error rate must not be
    significantly above the 1% that Learn-then-Test promises (binomial test at 1%), and most tokens exit."""
    engine = llm.engine
    model = engine.runner.model
    tau = ExitController(engine.config.sedac["precision_thresholds"], 0.99).thresholds(0.99, 1)[0]
    answers = llm.generate(prompts, SamplingParams(max_tokens=128, temperature=0.0))
    wrong = total = exits = 0
    for prompt, out in zip(prompts, answers):
        ids, first = prompt + list(out.token_ids), len(prompt) - 1
        _, full = et.teacher_pass(model, ids, [])
        _, draft = et.teacher_pass(model, ids, [], draft=True)
        best = model.logits(full[first:-1]).argmax(-1)
        logits = model.logits(draft[first:-1], draft=True).float()
        go = 1 - torch.ops.sedac.margin(logits) <= tau
        wrong += int((go & (logits.argmax(-1) != best)).sum())
        total, exits = total + len(best), exits + int(go.sum())
    assert total > 500 and exits > total / 2
    assert 1 - cal.binomial_cdf(wrong - 1, total, 0.01) > 0.01, (wrong, total)


def test_modes_mix_in_one_batch_on_the_real_engine(llm, prompts):
    modes = ["off", "lossy", "lossless", "lossy"] * 2
    outs = llm.generate(prompts, [SamplingParams(max_tokens=48, temperature=0.0, sedac_mode=m) for m in modes])
    off = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0))
    for mode, o, ref in zip(modes, outs, off):
        if mode != "lossy":
            assert o.token_ids == ref.token_ids
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
