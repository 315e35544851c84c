"""Certainty probes (Dynasor-style) on a tiny random model with reasoning markers: a probe forks every N
reasoning tokens on shared blocks, is never returned, and counts in o1_tokens; the reasoning block closes
once the last probes agree; without agreement the output is the plain request's; every block is free after
(also after an abort mid-probe); plain requests in the same batch keep their tokens; bad fields are errors."""

import httpx
import pytest

from sedac import LLM, SamplingParams
from sedac.runtime import probes as probes_module
from tests.servers import sedac_server


def _opened(llm, text="Question: what is 2+2?"):
    """A prompt whose template opened the reasoning block, so every generated token starts as reasoning."""
    return llm.tokenizer.encode(text + "\n<think>", add_special_tokens=False)


def _probing(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 48, "temperature": 0.0, "ignore_eos": True, "o1_probe_interval": 4, **kw})


def _all_free(llm) -> bool:
    return llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def _end_marker_at(llm, ids: list[int]) -> int | None:
    end = llm.engine.reasoning.end_ids
    return next((i for i in range(len(ids)) if ids[i : i + len(end)] == end), None)


@pytest.fixture(scope="module")
def llm(thinking_engine):
    return LLM(str(thinking_engine), device="cpu")


def test_reasoning_closes_once_the_last_probes_agree(llm, monkeypatch):
    """Probe answers made to agree (the extraction patched to one answer): the second probe's answer closes
    the block, so the end marker follows within the steps a probe takes, and the answer continues after it."""
    monkeypatch.setattr(probes_module, "extract_answer", lambda text, regex: "4")
    stops, saved = llm.engine.probes.counters["o1_probe_stops"], llm.engine.probes.counters["o1_probe_tokens_saved"]
    params = _probing(o1_probe_certainty=2)
    out = llm.generate([_opened(llm)], params)[0]
    at = _end_marker_at(llm, out.token_ids)
    assert at is not None and 8 <= at <= 8 + 1 + probes_module.PROBE_TOKENS  # after the 2nd probe (token 8)
    assert out.outputs[0].reasoning is not None and out.outputs[0].content  # the answer follows
    assert llm.engine.probes.counters["o1_probe_stops"] == stops + 1
    saved = llm.engine.probes.counters["o1_probe_tokens_saved"] - saved  # the reasoning's unspent allowance
    assert saved == params.max_tokens - at > 0  # closed right where the end marker starts
    assert out.metrics.o1_probes >= 2 and out.metrics.o1_tokens > out.metrics.num_generated_tokens
    assert len(out.outputs) == 1 and _all_free(llm)


def test_without_agreement_the_output_is_the_plain_requests(llm):
    """Real answers from a random model rarely agree: the probes then change nothing in the returned
    completion, one forks every 4 reasoning tokens, and their tokens count in o1_tokens only."""
    plain = llm.generate([_opened(llm)], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))[0]
    probed = llm.generate([_opened(llm)], _probing(o1_probe_certainty=48))[0]
    assert probed.token_ids == plain.token_ids and _end_marker_at(llm, plain.token_ids) is None
    assert probed.metrics.o1_probes == 48 // 4 - 1  # at reasoning tokens 4, 8, ..., 44 (48 ends the request)
    assert probed.metrics.num_generated_tokens == 48 < probed.metrics.o1_tokens
    assert _all_free(llm)


def test_probes_share_blocks_and_an_abort_frees_them(llm):
    engine = llm.engine
    engine.add_request("probed", _opened(llm), _probing())
    engine.add_request("plain", _opened(llm, "Another question?"), _probing(o1_probe_interval=None))
    while not engine.probes.parents:
        engine.step()
    probe, parent = next(iter(engine.probes.parents.items()))
    assert probe.block_table[:-1] == parent.block_table[:-1]  # the prefix blocks are shared, not copied
    engine.step()
    engine.abort_request("probed")
    assert not engine.probes.parents and not engine.probes.watched
    while engine.has_unfinished_requests():
        engine.step()
    assert _all_free(llm)


def test_plain_requests_in_the_batch_keep_their_tokens(llm):
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = llm.generate([_opened(llm, "Alone?")], plain)[0].token_ids
    mixed = llm.generate([_opened(llm), _opened(llm, "Alone?")], [_probing(), plain])
    assert mixed[1].token_ids == alone and mixed[0].metrics.o1_probes > 0


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"o1_probe_interval": 0}, "o1_probe_interval must be >= 1"),
        ({"o1_probe_interval": 4, "n": 2}, "o1_probe_interval takes n = 1"),
        ({"o1_probe_interval": 4, "o1_mode": "adaptive"}, "o1_mode adaptive does not take o1_probe_interval"),
        ({"o1_probe_certainty": 2}, "o1_probe_certainty applies with o1_probe_interval"),
    ],
)
def test_bad_probe_fields(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kw)


def test_probes_need_reasoning_markers(tiny_llama, thinking_engine):
    with pytest.raises(ValueError, match="o1_probe_interval needs a model with reasoning markers"):
        LLM(str(tiny_llama), device="cpu").engine.add_request("x", "hi", _probing())
    with sedac_server(thinking_engine) as (url, _):
        body = {"prompt": "hi", "max_tokens": 4, "o1_probe_interval": 0}
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 400
        body["o1_probe_interval"] = 2
        ok = httpx.post(url + "/v1/completions", json=body, timeout=30)
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert (
            ok.status_code == 200
            and "sedac:o1_probes_total" in metrics
            and "sedac:o1_probe_tokens_saved_total" in metrics
        )


def test_no_probe_without_room_for_its_cue(llm):
    """A request at the end of the context forks no probe that would run past max_seq_len."""
    max_len = llm.engine.config.build.max_seq_len
    prompt = _opened(llm, "word " * 400)[-(max_len - 8) :]
    out = llm.generate([prompt], _probing(max_tokens=8))[0]
    assert out.finish_reason == "length" and out.metrics.o1_probes == 0 and _all_free(llm)
