"""SEDAC on the real SmolLM2 engine (built with --sedac once per session), on held-out prompts."""
import pytest
import torch

from sedac import LLM, SamplingParams
from sedac.builder import calibration as cal
from sedac.builder import exit_training as et
from sedac.builder.datasets import sharegpt_prompts

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
    assert alone[0].metrics.acceptance_rate is not None      # it drafted (in the batch of 8 few rounds pay)


def test_calibration_guarantee_holds_on_held_out_answers(llm, prompts):
    """Thresholds calibrated on the calib split keep exit agreement >= 0.99 on the bench split's own
    greedy answers (teacher-forced, exactly what calibration measured on its split)."""
    engine = llm.engine
    layers = engine.config.sedac["lossy_layers"]
    answers = llm.generate(prompts, SamplingParams(max_tokens=96, temperature=0.0))
    docs = [(p + list(o.token_ids), len(p) - 1) for p, o in zip(prompts, answers)]
    feats = et.collect_features(engine.runner.model, docs, layers, 10 ** 6, "held-out")
    entropy, agree = zip(*(et.evaluate_exit_head(engine.runner.exit_heads[l], feats.hidden[l], feats.argmax)
                           for l in layers))
    thresholds = engine.exit_controller.thresholds(0.99, len(layers))
    where, wrong = cal.cascade(thresholds, list(entropy), list(agree))
    assert 1 - wrong.float().mean().item() >= 0.99
    assert len(wrong) > 500


def test_modes_mix_in_one_batch_on_the_real_engine(llm, prompts):
    modes = ["off", "lossy", "lossless", "lossy"] * 2
    outs = llm.generate(prompts, [SamplingParams(max_tokens=48, temperature=0.0, sedac_mode=m) for m in modes])
    off = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0))
    for mode, o, ref in zip(modes, outs, off):
        if mode != "lossy":
            assert o.token_ids == ref.token_ids
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
