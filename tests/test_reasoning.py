"""Thinking budgets on a tiny random model with reasoning markers: the reasoning block never holds more than
the budget (the end marker is forced when it is spent) in every API; outputs split reasoning from the
answer; markers come from the chat template or the build; bad budgets and markerless engines are errors."""

import json
import shutil

import httpx
import openai
import pytest
from click.testing import CliRunner

from sedac import LLM, SamplingParams
from sedac.cli.build import main as build_main
from sedac.config import EngineConfig
from sedac.runtime.reasoning import ReasoningMarkers, ThinkingBudgets
from tests.conftest import MARKERS
from tests.servers import sedac_server


def _opened(llm, text="Question: what is 2+2?"):
    """A prompt whose template opened the reasoning block (as R1-style templates do)."""
    return llm.tokenizer.encode(text + "\n<think>", add_special_tokens=False)


@pytest.mark.parametrize("budget", [1, 5, 17])
def test_budget_forces_the_end_marker_and_the_answer_follows(thinking_engine, budget):
    llm = LLM(str(thinking_engine), device="cpu")
    end_ids = llm.engine.reasoning.end_ids
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, thinking_token_budget=budget, n=2, seed=1)
    out = llm.generate([_opened(llm)], params)[0]
    for o in out.outputs:
        ids = o.token_ids
        at = next(i for i in range(len(ids)) if ids[i : i + len(end_ids)] == end_ids)
        assert at <= budget  # never more reasoning tokens than the budget
        assert o.reasoning is not None and "</think>" not in o.reasoning and "</think>" not in o.content
        assert "</think>" in o.text and o.text.endswith(o.content)  # text stays the raw output
        assert len(ids) == 40 and o.content  # and the answer continues after it
    unbounded = llm.generate([_opened(llm)], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    assert unbounded.outputs[0].reasoning is not None  # the split applies without a budget too


def test_budget_starts_counting_when_the_model_opens_the_block(thinking_engine):
    budgets = ThinkingBudgets(LLM(str(thinking_engine), device="cpu").tokenizer, MARKERS)
    seq = object()
    budgets.start(seq, 2, [5, 6, 7])  # the prompt did not open it
    out = [11, 12]
    for t in out:
        budgets.observe(seq, out[: out.index(t) + 1])
    assert budgets.override(seq, 99) == 99  # outside the block: nothing forced
    out += budgets.start_ids
    budgets.observe(seq, out)
    for t in (21, 22):
        assert budgets.override(seq, t) == t
        out.append(t)
        budgets.observe(seq, out)
    forced = [budgets.override(seq, 0) for _ in budgets.end_ids]
    assert forced == budgets.end_ids
    assert budgets.split("a<think>xy</think>\nanswer", False) == ("xy", "aanswer")
    assert budgets.split("reasoning so far </thi", True) == ("reasoning so far ", "")  # partial marker held


def test_bad_budgets_and_markerless_engines(thinking_engine, tiny_llama, tiny_sedac_engine):
    with pytest.raises(ValueError, match="thinking_token_budget must be >= 1"):
        SamplingParams(thinking_token_budget=0)
    with pytest.raises(ValueError, match="thinking_token_budget must be an integer"):
        SamplingParams(thinking_token_budget=2.5)
    with pytest.raises(ValueError, match="needs a model with reasoning markers.*--reasoning-start"):
        LLM(str(tiny_llama), device="cpu").generate("x", SamplingParams(thinking_token_budget=4))
    with pytest.raises(ValueError, match="sedac_mode lossless does not take thinking_token_budget"):
        LLM(str(tiny_sedac_engine), device="cpu").generate(
            "x", SamplingParams(thinking_token_budget=4, sedac_mode="lossless")
        )
    assert EngineConfig.load(thinking_engine).reasoning == {"start": "<think>", "end": "</think>"}
    out = CliRunner().invoke(build_main, ["--model", "x", "--output", "y", "--reasoning-start", "<think>"])
    assert out.exit_code != 0 and "give both --reasoning-start and --reasoning-end" in out.output
    assert ReasoningMarkers.from_template("{% if x %}<think>{% endif %}</think>") == MARKERS
    assert ReasoningMarkers.from_template("no markers here") is None


def test_mixed_batch_gives_plain_requests_their_tokens(thinking_engine):
    llm = LLM(str(thinking_engine), device="cpu")
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = llm.generate(["plain prompt", "another one"], plain)
    budgeted = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, thinking_token_budget=2)
    mixed = llm.generate(["plain prompt", _opened(llm), "another one"], [plain, budgeted, plain])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [o.token_ids for o in alone]


def test_server_reasoning_fields_and_streaming(thinking_engine, tmp_path):
    engine = tmp_path / "opened"  # its chat template opens the reasoning block, as R1's does
    shutil.copytree(thinking_engine, engine)
    template = (engine / "chat_template.jinja").read_text()
    (engine / "chat_template.jinja").write_text(
        template.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>'")
    )
    with sedac_server(engine, "--served-model-name", "t") as (base, _):
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        prompt = httpx.post(base + "/tokenize", json={"prompt": "Q?\n<think>"}, timeout=30).json()["tokens"]
        r = c.completions.create(
            model="t",
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            extra_body={"thinking_token_budget": 3, "ignore_eos": True},
        )
        assert "</think>" in r.choices[0].text  # completions return the raw text
        messages = [{"role": "user", "content": "Q?"}]
        r = c.chat.completions.create(
            model="t",
            messages=messages,
            max_tokens=30,
            temperature=0,
            extra_body={"thinking_token_budget": 3, "ignore_eos": True},
        )
        message = r.choices[0].message.model_dump()
        assert message["reasoning"] and message["content"] and "think>" not in message["content"] + message["reasoning"]
        stream = c.chat.completions.create(
            model="t",
            messages=messages,
            max_tokens=30,
            temperature=0,
            stream=True,
            extra_body={"thinking_token_budget": 3, "ignore_eos": True},
        )
        chunks = [ch.choices[0].delta.model_dump() for ch in stream if ch.choices]
        assert "".join(d.get("reasoning") or "" for d in chunks) == message["reasoning"]  # SSE: its own field
        assert "".join(d.get("content") or "" for d in chunks) == message["content"]
        for body, message in (
            ({"thinking_token_budget": 0}, "thinking_token_budget"),
            ({"reasoning_effort": "extreme"}, "reasoning_effort"),
            ({"thinking_token_budget": 5, "reasoning_effort": "low"}, "not both"),
        ):
            with pytest.raises(openai.BadRequestError, match=message):
                c.chat.completions.create(model="t", messages=messages, max_tokens=4, extra_body=body)
        assert json.loads(httpx.get(base + "/health", timeout=10).text)["status"] == "ok"
        metrics = httpx.get(base + "/metrics", timeout=10).text
        exhausted = [line for line in metrics.splitlines() if line.startswith("sedac:thinking_budget_exhausted_total")]
        assert exhausted and float(exhausted[0].split()[-1]) >= 3  # the three budgeted requests above
