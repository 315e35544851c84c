"""SEDAC's draft copies at int8 or int4 over every base that has a cheaper copy: which candidates a build
measures, int4 drafts over an fp32 and an int8 base lossless, and the draft pass really on the copy."""

import pytest
import torch

from sedac import LLM, SamplingParams
from sedac.builder import SedacOptions, build_engine
from sedac.builder.exit_training import teacher_pass
from sedac.builder.sedac_build import draft_candidates
from sedac.config import BuildConfig
from tests.conftest import TINY_SEDAC
from tests.test_sedac import PROMPTS, always_draft, greedy


def test_draft_candidates_are_the_copies_cheaper_than_the_base():
    assert draft_candidates("fp32") == draft_candidates("bf16") == ("int8", "int4")
    assert draft_candidates("int8") == ("int4",)
    assert draft_candidates("int4") == draft_candidates("gguf") == ()
    assert SedacOptions(draft_precision="int4").drafts("fp16") == ("int4",)
    with pytest.raises(ValueError, match="--draft-precision int8 over a int8 base"):
        SedacOptions(draft_precision="int8").drafts("int8")


def _draft_logits(llm, ids) -> torch.Tensor:
    model = llm.engine.runner.model
    _, final = teacher_pass(model, ids, [], draft=True)
    return model.logits(final, draft=True).float()


def test_int4_draft_copies_replace_the_int8_ones_and_stay_close_to_the_model(tiny_sedac_engine):
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    runner, ids = llm.engine.runner, list(range(5, 45))
    runner.make_draft_copies("int8")
    int8 = _draft_logits(llm, ids)
    runner.make_draft_copies("int4")
    assert all(layer.qkv_proj.draft_blocks is not None for layer in runner.model.layers)
    int4 = _draft_logits(llm, ids)
    _, final = teacher_pass(runner.model, ids, [])
    full = runner.model.logits(final).float()
    assert not torch.equal(int4, int8)  # the passes ran on the int4 copies, not the int8 ones
    # 4 bits per weight cost a random model's logits ~half their norm (int8's less); a wrong layout all of it
    assert (int8 - full).norm() < (int4 - full).norm() < 0.7 * full.norm()
    with pytest.raises(ValueError, match="draft precision must be one of int8, int4"):
        runner.make_draft_copies("int2")


def test_int4_drafts_over_an_fp32_base_are_token_identical_to_off(tiny_sedac_engine):
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    llm.engine.runner.make_draft_copies("int4")
    always_draft(llm.engine)
    off = llm.generate(PROMPTS, greedy("off"))
    lossless = llm.generate(PROMPTS, greedy("lossless"))
    assert [o.token_ids for o in lossless] == [o.token_ids for o in off]
    assert llm.engine.counters["sedac_drafted_tokens"] > 0 and llm.engine.counters["sedac_accepted_tokens"] > 0


@pytest.fixture(scope="module")
def int8_sedac_engine(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("sedac-int8") / "llama"
    build = BuildConfig(precision="int8", max_batch_size=8, max_seq_len=256, max_num_tokens=256, kv_block_size=4)
    build_engine(str(tiny_models["llama"]), path, build, SedacOptions(**TINY_SEDAC))
    return path


def test_an_int8_engine_drafts_on_int4_copies(int8_sedac_engine):
    llm = LLM(str(int8_sedac_engine), device="cpu")
    sedac = llm.engine.config.sedac
    assert sedac["draft_precision"] == "int4" and set(sedac["draft_candidates"]) == {"int4"}
    assert llm.engine.runner.model.layers[0].qkv_proj.draft_blocks is not None
    always_draft(llm.engine)
    params = [greedy("off"), greedy("lossless"), SamplingParams(max_tokens=24, temperature=0.0, sedac_mode="lossy")]
    off, lossless, lossy = (llm.generate(PROMPTS, p) for p in params)
    assert [o.token_ids for o in lossless] == [o.token_ids for o in off]
    assert llm.engine.counters["sedac_drafted_tokens"] > 0
    assert all(o.token_ids for o in lossy)


def test_the_precision_exit_is_priced_with_each_exits_later_full_row():
    """Every token runs one full-pass row, at once or with the next stay, so a draft copy that lets every
    token out still costs its pass plus that row: cheaper than off only by the full pass's fixed cost."""
    from sedac.builder import calibration as cal
    from sedac.builder.sedac_build import _calibrate_precision_exit

    documents = torch.repeat_interleave(torch.arange(40), 30)
    costs = {"full": [0.9, 0.1], "draft": [0.3, 0.1]}
    uncertainty, agree = torch.rand(len(documents), generator=torch.Generator().manual_seed(0)), torch.ones(1200) > 0
    out = _calibrate_precision_exit(uncertainty, agree, costs, 0.45, documents, cal.document_split(documents))
    assert out["precision_exit_fraction"]["0.99"] == 1.0
    assert out["predicted_precision_lossy_cost_at_0.99"] == pytest.approx(0.3 + 0.1 + 0.1)
    assert out["lossy_exit"] == "depth"  # 0.45 beats it


def test_pass_costs_are_measured_once_on_a_device_other_than_the_builds(tiny_sedac_engine, tmp_path, monkeypatch):
    """A GPU (here: a config claiming another device) plans with costs measured where it serves, cached by device."""
    import json
    import shutil

    from sedac.runtime import pass_costs

    engine = tmp_path / "engine"
    shutil.copytree(tiny_sedac_engine, engine)
    config = json.loads((engine / "config.json").read_text())
    assert config["sedac"]["costs_device"] == pass_costs.device_name(torch.device("cpu"))  # recorded by the build
    config["sedac"]["costs_device"] = "another device"
    (engine / "config.json").write_text(json.dumps(config))
    measured = []
    measure = pass_costs.measure_pass_costs
    monkeypatch.setattr(pass_costs, "measure_pass_costs", lambda runner: measured.append(1) or measure(runner))
    first = LLM(str(engine), device="cpu")
    cached = json.loads((engine / pass_costs.COSTS_FILE).read_text())
    here = pass_costs.device_name(torch.device("cpu"))
    assert measured == [1] and set(cached) == {here}
    assert first.engine.sedac.costs["full"] == cached[here]["full"] != config["sedac"]["costs"]["full"]
    second = LLM(str(engine), device="cpu")
    assert measured == [1] and second.engine.sedac.costs["draft"] == cached[here]["draft"]  # read, not measured
