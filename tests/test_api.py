"""Python API: detokenization, streaming, chat, and clear ValueErrors for bad input."""

import json

import pytest

from sedac import LLM, SamplingParams
from sedac.runtime import detokenizer


def test_incremental_detokenization_never_breaks_characters(smollm2_tokenizer):
    text = "Größe 你好世界 🚀🔥 naïve café — ∑x² ok"
    prompt = smollm2_tokenizer.encode("hi", add_special_tokens=False)
    ids = prompt + smollm2_tokenizer.encode(text, add_special_tokens=False)
    state, deltas = detokenizer.start(len(prompt)), []
    for end in range(len(prompt) + 1, len(ids) + 1):
        deltas.append(detokenizer.decode_new_text(smollm2_tokenizer, ids[:end], state, True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids[len(prompt) :])
    assert any(d == "" for d in deltas)  # some tokens hold only part of a character


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), device="cpu")


def test_stream_deltas_concatenate_to_generate_text(llm):
    params = SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)
    streamed = "".join(llm.stream("Hello there", params))
    assert streamed == llm.generate("Hello there", params)[0].text
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_stream_closed_early_aborts_and_frees(llm):
    gen = llm.stream("Hello there", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    next(gen)
    gen.close()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_chat_applies_template(llm):
    messages = [{"role": "user", "content": "Hi!"}]
    out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0))[0]
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.prompt_token_ids == llm.tokenizer.encode(ids, add_special_tokens=False)
    assert out.metrics.ttft > 0 and out.metrics.e2e >= out.metrics.ttft


def test_generate_returns_metrics(llm):
    out = llm.generate(["a b c"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    m = out.metrics
    assert m.num_generated_tokens == 6 and m.tpot > 0 and m.e2e >= m.ttft > 0


def test_prompt_too_long_raises(llm):
    with pytest.raises(ValueError, match="max_seq_len"):
        llm.generate(list(range(300)), SamplingParams(max_tokens=1))


def test_bad_request_in_batch_fails_alone(llm):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = llm.generate(["fine", list(range(300)), [10**9], "also fine"], params)
    assert [o.finish_reason for o in outs] == ["length", "error", "error", "length"]
    assert "max_seq_len" in outs[1].error and outs[0].text and outs[3].text


@pytest.mark.parametrize("prompt", [[], "", [1.5], [-1], None])
def test_invalid_prompts_raise(llm, prompt):
    with pytest.raises(ValueError):
        llm.engine.add_request("x", prompt, SamplingParams())


def test_missing_and_corrupt_engines_raise(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="not found"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        LLM(str(bad))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="weights"):
        LLM(str(broken))
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["format_version"] = 99
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format version"):
        LLM(str(broken))


def test_sedac_modes_need_a_sedac_engine(llm):
    with pytest.raises(ValueError, match="--sedac"):
        llm.generate("hi", SamplingParams(max_tokens=2, sedac_mode="lossless"))
    with pytest.raises(ValueError, match="sedac_mode"):
        SamplingParams(sedac_mode="fast")
    assert llm.generate("hi", SamplingParams(max_tokens=2, sedac_mode="off"))[0].finish_reason
