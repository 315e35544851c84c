"""Sampling parameters: validation, determinism, filters, stops, n > 1 and logprobs."""

import pytest
import torch

from sedac import LLM, SamplingParams
from sedac.runtime.sampler import filtered_probs, greedy_tokens

PROMPT = [1, 520, 9531, 198, 33]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), device="cpu")


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(min_p=2),
        dict(n=0),
        dict(seed=-1),
        dict(logprobs=50),
        dict(repetition_penalty=0),
        dict(presence_penalty=3),
        dict(max_tokens="5"),
        dict(stop=[""]),
        dict(temperature=float("nan")),
        dict(min_tokens=-1),
        dict(min_tokens=9, max_tokens=8),
        dict(logit_bias={5: 101}),
        dict(logit_bias={-1: 1.0}),
        dict(logit_bias={"5": 1.0}),
        dict(logit_bias=[5]),
        dict(min_tokens=2, structured_outputs={"regex": "a+"}),
    ],
)
def test_invalid_params_raise_value_error(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_seed_reproducible_and_varies(llm):
    def p(seed):
        return SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)

    a, b, c = (llm.generate([PROMPT], p(s))[0].token_ids for s in (7, 7, 8))
    assert a == b and a != c


def test_seeded_sample_independent_of_batch(llm):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    alone = llm.generate([PROMPT], p)[0].token_ids
    batched = llm.generate([list(range(50, 90)), PROMPT, [4, 4]], p)[1].token_ids
    assert alone == batched


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].token_ids
    top1 = llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True))[0]
    assert top1.token_ids == greedy


def test_greedy_choices_take_the_cpu_argmax_kernel(llm, monkeypatch):
    """Greedy rows are chosen by argmax_rows (sampling runs with autograd on, outside the model's
    inference mode), and the tokens are torch.argmax's."""
    calls = []
    kernel = torch.ops.sedac_cpu.argmax_rows
    monkeypatch.setattr(torch.ops.sedac_cpu, "argmax_rows", lambda x: calls.append(x.shape) or kernel(x))
    out = llm.generate(["Hello there"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4 and len(calls) == 4
    logits = torch.randn(3, 1000, requires_grad=False)
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))


def test_filters_mask_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def probs(**kw):
        return filtered_probs(logits, [SamplingParams(temperature=1.0, **kw)])[0]

    assert (probs(top_k=2) > 0).tolist() == [True, True, False, False]
    assert (probs(top_p=0.8) > 0).tolist() == [True, True, False, False]
    assert (probs(top_p=0.81) > 0).tolist() == [True, True, True, False]
    assert (probs(min_p=0.2) > 0).tolist() == [True, True, True, False]
    assert torch.allclose(probs(top_k=2)[:2], torch.tensor([0.625, 0.375]))


def test_stop_token_and_max_tokens(llm):
    free = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_at = free.token_ids[5]
    stopped = llm.generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
    )[0]
    first = free.token_ids.index(stop_at)
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == stop_at


def test_stop_string_truncates_text(llm):
    free = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    needle = free.text[8:11]
    assert needle
    out = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[needle]))[0]
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.find(needle)]


def test_n_samples_share_prompt_and_match_seeded_singles(llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=11, n=3, ignore_eos=True)
    out = llm.generate([list(range(30, 47))], p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:  # sample i uses seed + i, so it equals a single request with that seed
        single = SamplingParams(max_tokens=10, temperature=1.0, seed=11 + c.index, ignore_eos=True)
        assert c.token_ids == llm.generate([list(range(30, 47))], single)[0].token_ids
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_logprobs(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 5
    for tok, entry in zip(out.token_ids, lps):
        assert tok in entry and 3 <= len(entry) <= 4
        assert entry[tok] == max(entry.values()) <= 0.0  # greedy picks the top logprob


def test_penalties_follow_hf_and_openai_rules():
    from sedac.runtime.sampler import _apply_penalties
    from sedac.runtime.sequence import Sequence

    seq = Sequence("r", [0, 1], SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25))
    seq.token_ids += [2, 2]  # output tokens: 2 twice
    logits = torch.tensor([[4.0, -4.0, 4.0, 4.0]])
    out = _apply_penalties(logits, [seq])[0].tolist()
    # repetition on prompt+output (positive / 2, negative * 2); frequency 0.5*2 + presence 0.25 on output only
    assert out == [2.0, -8.0, 2.0 - 1.0 - 0.25, 4.0]
    assert logits[0, 0] == 4.0  # the caller's logits are untouched


def test_bad_words_are_never_generated(llm):
    free = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    banned_word = llm.tokenizer.decode([free.token_ids[2]])
    out = llm.generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, bad_words=[banned_word])
    )[0]
    banned_ids = llm.engine._bad_words_ids(SamplingParams(bad_words=[banned_word]))
    assert out.token_ids[:2] == free.token_ids[:2] and out.token_ids[2] != free.token_ids[2]
    assert not any(ids == [t] for ids in banned_ids for t in out.token_ids)


def test_logit_bias_moves_the_choice(llm):
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    plain = llm.generate([PROMPT], greedy)[0].token_ids
    forced = llm.generate(
        [PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={77: 100.0})
    )[0].token_ids
    assert forced == [77] * 6 != plain
    avoided = llm.generate(
        [PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={plain[0]: -100.0})
    )[0].token_ids
    assert avoided[0] != plain[0]
    with pytest.raises(ValueError, match="logit_bias has token ids outside the vocabulary"):
        llm.engine.add_request("out-of-vocabulary", PROMPT, SamplingParams(logit_bias={10**6: 1.0}))


def test_min_tokens_holds_back_every_stop(llm):
    """EOS pushed to the top by logit_bias ends at once; min_tokens=4 bans it (and stop_token_ids) for four
    tokens and ignores stop strings until then, as vLLM does; the fifth token is EOS."""
    eos = llm.engine.config.model.eos_token_ids[0]

    def params(**kw):
        return SamplingParams(max_tokens=8, temperature=0.0, logit_bias={eos: 100.0}, **kw)

    assert llm.generate([PROMPT], params())[0].token_ids == [eos]
    held = llm.generate([PROMPT], params(min_tokens=4))[0]
    assert len(held.token_ids) == 5 and held.token_ids[-1] == eos and eos not in held.token_ids[:4]
    assert held.finish_reason == "stop"
    free = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    stopped = llm.generate(
        [PROMPT],
        SamplingParams(
            max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[free.token_ids[0]], min_tokens=3
        ),
    )[0]
    assert free.token_ids[0] not in stopped.token_ids[:3] and len(stopped.token_ids) >= 3
    text = llm.generate(
        [PROMPT], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=[free.text[:1]], min_tokens=8)
    )[0]
    assert text.finish_reason == "length" and len(text.token_ids) == 8


def test_min_tokens_near_the_context_end_and_with_ignore_eos(llm):
    """The context's end stops a sequence whatever min_tokens asks (no position past max_seq_len); with
    ignore_eos EOS is not held back (vLLM: it is no stop then)."""
    max_len = llm.engine.config.build.max_seq_len
    long_prompt = (PROMPT * 100)[: max_len - 3]
    out = llm.generate([long_prompt], SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    eos = llm.engine.config.model.eos_token_ids[0]
    forced = SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={eos: 100.0})
    assert llm.generate([PROMPT], forced)[0].token_ids == [eos] * 4
