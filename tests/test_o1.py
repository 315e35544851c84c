"""O1 adaptive compute on a tiny random model (every token is uncertain there, so every row may branch):
branches are copy-on-write forks sharing their parent's blocks, every block is free after (also after an
abort mid-branch), the branch budget holds, greedy requests stay deterministic, the vote early-stops when
finished branches agree, plain requests in the same batch get their tokens as alone, and bad fields are
errors in the API and over HTTP (the server keeps serving)."""

import httpx
import pytest

from sedac import LLM, SamplingParams
from sedac.runtime.engine import LLMEngine
from sedac.runtime.o1 import extract_answer
from tests.servers import sedac_server
from tests.test_parity_tiny import PROMPTS


def _adaptive(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 12, "temperature": 0.0, "o1_mode": "adaptive", "o1_max_branches": 4, **kw})


def _all_free(llm) -> bool:
    return llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


@pytest.mark.parametrize("branches", [1, 3, 6])
def test_branch_budget_holds_and_blocks_are_free_after(tiny_llama, branches):
    llm = LLM(str(tiny_llama), device="cpu")
    out = llm.generate([PROMPTS[0]], _adaptive(o1_max_branches=branches))[0]
    assert out.metrics.o1_branches == branches - 1  # the tiny model is uncertain everywhere
    assert out.metrics.o1_tokens >= 12 * branches - branches  # every branch's tokens
    assert out.metrics.num_generated_tokens == len(out.token_ids)  # the returned completion's
    assert len(out.outputs) == 1 and out.outputs[0].confidence > 0
    assert llm.engine.stats()["o1_branches"] == branches - 1
    assert _all_free(llm)


def test_branches_share_their_parents_blocks(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu")
    llm.engine.add_request("r", PROMPTS[2], _adaptive())
    for _ in range(3):
        llm.engine.step()
    seqs = llm.engine.requests["r"].seqs
    assert len(seqs) > 1
    root, branch = seqs[0], seqs[1]
    prompt_blocks = len(PROMPTS[2]) // llm.engine.blocks.block_size
    assert branch.block_table[:prompt_blocks] == root.block_table[:prompt_blocks]  # shared, not copied
    assert all(llm.engine.blocks.ref_counts[b] >= 2 for b in root.block_table[:prompt_blocks])
    llm.engine.abort_request("r")  # mid-branch
    assert _all_free(llm)


def test_greedy_adaptive_is_deterministic_and_votes_a_branch(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu")
    first, again = (llm.generate([PROMPTS[1]], _adaptive())[0] for _ in range(2))
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert first.outputs[0].confidence == pytest.approx(again.outputs[0].confidence, rel=1e-4)  # prefix-cached 2nd run


def test_mixed_batch_gives_plain_requests_their_tokens_alone(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu")
    plain = SamplingParams(max_tokens=12, temperature=0.0)
    alone = [o.token_ids for o in llm.generate(PROMPTS, plain)]
    mixed = llm.generate(PROMPTS + PROMPTS[:2], [plain] * len(PROMPTS) + [_adaptive()] * 2)
    assert [o.token_ids for o in mixed[: len(PROMPTS)]] == alone
    assert all(o.metrics.o1_branches == 3 for o in mixed[len(PROMPTS) :])
    assert _all_free(llm)


def test_vote_stops_early_once_finished_branches_agree(tiny_llama):
    """Every branch's first token (the root's runner-up at that position) is made a stop token, so branches
    end at once while the root still runs; every branch is read as answering "42": after three the vote is
    decided and the root is cut short."""
    llm = LLM(str(tiny_llama), device="cpu")
    path = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.0, logprobs=2))[0]
    runner_ups = [next(t for t in top if t != chosen) for chosen, top in zip(path.token_ids, path.outputs[0].logprobs)]
    llm.engine.add_request("r", PROMPTS[0], _adaptive(max_tokens=8, o1_max_branches=8, stop_token_ids=runner_ups))
    llm.engine.o1.trees["r"].answer_text = lambda seq: "the answer is 42"
    outs = [o for _ in range(20) for o in llm.engine.step() if o.finished]
    out = outs[0]
    assert out.metrics.o1_early_stopped and out.metrics.o1_branches >= 3
    assert out.metrics.o1_tokens < 8 + out.metrics.o1_branches * 8  # the root was cut short
    assert out.outputs[0].finish_reason == "stop"  # a branch that ended on its own
    stats = llm.engine.stats()
    assert stats["o1_early_stops"] == 1
    # the root's unspent max_tokens (and any branch cut with it) counted as saved, within what all could spend
    assert 0 < stats["o1_early_stop_tokens_saved"] <= 8 * (out.metrics.o1_branches + 1) - out.metrics.o1_tokens
    assert _all_free(llm)


def test_vote_weighs_answers_by_confidence_and_skips_empty_ones(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu")
    llm.engine.add_request("r", PROMPTS[0], _adaptive(max_tokens=4, o1_max_branches=4, answer_regex=r"(\d+)"))
    tree = llm.engine.o1.trees["r"]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    seqs = list(tree.logprob_sums)
    assert len(seqs) == 4
    answers = iter(["7", "", "8", "7"])  # branch 1 has no answer; "7" wins with two votes
    texts = {s: f"so {a}" if a else "no number" for s, a in zip(seqs, answers)}
    tree.answer_text = texts.__getitem__
    llm.engine.o1.trees["r"] = tree  # released when the request finished
    vote = llm.engine.o1.vote("r", seqs)
    assert vote.weights.keys() == {"7", "8"} and extract_answer(texts[vote.chosen], r"(\d+)") == "7"
    assert vote.confidence == pytest.approx((tree.confidence(seqs[0]) + tree.confidence(seqs[3])) / 4)


def test_engine_default_mode(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", o1_mode="adaptive")
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0.0, o1_max_branches=2))[0]
    assert out.metrics.o1_branches == 1
    two = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0.0, n=2))[0]  # n > 1: runs off
    assert len(two.outputs) == 2 and two.metrics.o1_branches == 0


def test_answer_extraction():
    assert extract_answer("so it is 12. The answer is  42.", r"answer is\s+(\d+)") == "42"
    assert extract_answer("The answer is: Paris.", None) == "the answer is: paris"
    assert extract_answer("no number here", r"(\d+)") == ""


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"o1_mode": "always"}, "o1_mode"),
        ({"o1_mode": "adaptive", "o1_max_branches": 0}, "o1_max_branches"),
        ({"o1_mode": "adaptive", "o1_entropy_threshold": -1.0}, "o1_entropy_threshold"),
        ({"o1_mode": "adaptive", "answer_regex": "(unclosed"}, "answer_regex"),
        ({"o1_mode": "adaptive", "n": 2}, "n > 1"),
        ({"o1_mode": "adaptive", "structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs"),
        ({"o1_mode": "off", "answer_regex": "(\\d+)"}, "adaptive only"),
    ],
)
def test_bad_o1_fields(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kw)


def test_o1_with_sedac_mode_is_an_error():
    with pytest.raises(ValueError, match="sedac_mode lossless does not take o1_mode adaptive"):
        LLMEngine._sedac_capable(_adaptive(sedac_mode="lossless"))


def test_server_o1_fields(tiny_llama):
    with sedac_server(tiny_llama) as (url, _):
        body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "o1_mode": "adaptive", "o1_max_branches": 3}
        ok = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["confidence"] > 0
        bad = httpx.post(f"{url}/v1/completions", json={**body, "o1_mode": "sometimes"}, timeout=60)
        assert bad.status_code == 400 and "o1_mode" in bad.text
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'sedac:o1_branches_total{model_name="llama"} 4.0' in metrics  # two requests x 2 branches
        assert 'sedac:o1_tokens_total{model_name="llama"} 36.0' in metrics  # 2 x 3 branches x 6 tokens


def test_o1_bench_reports_every_strategy(tiny_llama, tmp_path):
    from sedac.cli.o1_bench import run_o1_bench

    results = run_o1_bench(str(tiny_llama), "cpu", 3, max_tokens=6, report=tmp_path / "o1")
    assert {"greedy", "self-consistency@4", "self-consistency@8"} <= set(results["rows"])
    adaptive = [r for name, r in results["rows"].items() if name.startswith("adaptive")]
    assert len(adaptive) == 3 and all(r["branches_per_question"] >= 1 for r in adaptive)  # tiny: always uncertain
    assert results["rows"]["self-consistency@8"]["tokens"] == 8 * 3 * 6
    reasoning = {name: r for name, r in results["rows"].items() if "budget" in name or "probes" in name}
    assert len(reasoning) == 4 and all(r["probes_per_question"] > 0 for n, r in reasoning.items() if "probes" in n)
    assert "reasoning prompt (no limit)" in results["rows"]  # markers the tiny engine lacks come from the bench
    assert (tmp_path / "o1" / "report.md").read_text().count("| adaptive") == 3
    assert (tmp_path / "o1" / "accuracy_vs_tokens.png").is_file()
