"""Structured outputs (xgrammar): every constrained output is in its language, whatever the model (a random
tiny model here, the real SmolLM2 below), for each kind of constraint, with n > 1, sampling, and other
requests in the same batches left as they were; bad grammars and conflicting fields are named errors; the
OpenAI server maps response_format, structured_outputs and vLLM's guided_* onto them."""

import json
import re

import openai
import pytest

from sedac import LLM, SamplingParams
from sedac.runtime.structured_outputs import StructuredOutputsParams
from tests.servers import sedac_server
from tests.test_sedac import always_draft

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["ok", "n", "tag"],
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["red", "green", "blue"]},
    },
}
PROMPTS = ["Give me a record:", "Answer in JSON please", "x"]


def _valid(record: dict) -> bool:
    return (
        set(record) == {"ok", "n", "tag"}
        and isinstance(record["ok"], bool)
        and isinstance(record["n"], int)
        and 0 <= record["n"] <= 99
        and record["tag"] in ("red", "green", "blue")
    )


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), device="cpu")


def test_params_name_what_is_wrong():
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar, json_object"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match=r"exactly one .* \(got regex, choice\)"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        SamplingParams(structured_outputs={"choice": []})
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams(structured_outputs={"jsonschema": {}})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_are_valid_records(llm, temperature):
    params = SamplingParams(
        max_tokens=64, temperature=temperature, seed=3, n=2, structured_outputs=StructuredOutputsParams(json=SCHEMA)
    )
    outs = llm.generate(PROMPTS, params)
    for out in outs:
        assert len(out.outputs) == 2
        for o in out.outputs:
            assert o.finish_reason == "stop" and _valid(json.loads(o.text)), o.text


def test_regex_choice_grammar_and_json_object(llm):
    regex = llm.generate(
        PROMPTS, SamplingParams(max_tokens=20, temperature=1.0, seed=1, structured_outputs={"regex": r"[a-c]{3}-\d{2}"})
    )
    assert all(re.fullmatch(r"[a-c]{3}-\d{2}", o.outputs[0].text) for o in regex)
    choices = ["alpha beta", "gamma (3)", "delta?"]
    chosen = llm.generate(
        PROMPTS, SamplingParams(max_tokens=20, temperature=1.0, seed=2, structured_outputs={"choice": choices})
    )
    assert all(o.outputs[0].text in choices for o in chosen)
    grammar = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    sums = llm.generate(
        PROMPTS, SamplingParams(max_tokens=30, temperature=0.0, structured_outputs={"grammar": grammar})
    )
    for o in sums:
        assert o.outputs[0].finish_reason == "length" or re.fullmatch(r"\(\d(\+\d)*\)", o.outputs[0].text)
        assert re.fullmatch(r"\(\d(\+\d)*\)?", o.outputs[0].text)  # a prefix of the language at worst
    obj = llm.generate(
        PROMPTS[:1], SamplingParams(max_tokens=200, temperature=0.0, structured_outputs={"json_object": True})
    )[0].outputs[0]
    assert obj.text.startswith("{")
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.text), dict)


def test_constrained_and_free_requests_share_batches(llm):
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free)]
    engine = llm.engine
    constrained = SamplingParams(max_tokens=40, temperature=0.0, structured_outputs={"json": SCHEMA})
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"free-{i}", p, free)
        engine.add_request(f"json-{i}", p, constrained)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    assert [done[f"free-{i}"].token_ids for i in range(len(PROMPTS))] == alone
    assert all(_valid(json.loads(done[f"json-{i}"].text)) for i in range(len(PROMPTS)))
    assert not engine.structured.matchers  # every matcher released at the end


def test_bad_grammars_and_sedac_modes_are_errors(llm, tiny_sedac_engine):
    with pytest.raises(ValueError, match="structured_outputs.regex is invalid: Regex parsing error"):
        llm.generate("x", SamplingParams(structured_outputs={"regex": "(unclosed"}))
    with pytest.raises(ValueError, match="structured_outputs.json is invalid"):
        llm.generate("x", SamplingParams(structured_outputs={"json": {"type": "no-such-type"}}))
    with pytest.raises(ValueError, match='structured_outputs.grammar is invalid: .*Rule "missing" is not defined'):
        llm.generate("x", SamplingParams(structured_outputs={"grammar": "root ::= missing"}))
    outs = llm.generate(["x", "y"], SamplingParams(max_tokens=4, structured_outputs={"regex": "("}))
    assert all(o.outputs[0].finish_reason == "error" for o in outs)  # in a list: error outputs, no raise
    nothing = SamplingParams(max_tokens=6, temperature=0.0, structured_outputs={"regex": r"[^\s\S]"})
    free = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    dead, other = llm.generate(["x", "y"], [nothing, free])  # a grammar nothing matches: that request ends
    assert (dead.outputs[0].finish_reason, dead.outputs[0].text) == ("abort", "")
    assert "no token of this vocabulary continues the grammar" in dead.outputs[0].stop_reason
    assert other.outputs[0].token_ids == llm.generate("y", free)[0].outputs[0].token_ids  # and no other
    sedac = LLM(str(tiny_sedac_engine), device="cpu", sedac_mode="lossy")
    with pytest.raises(ValueError, match="sedac_mode lossy does not take structured_outputs"):
        sedac.generate("x", SamplingParams(sedac_mode="lossy", structured_outputs={"choice": ["a"]}))
    out = sedac.generate(
        ["x"], SamplingParams(max_tokens=8, temperature=0.0, structured_outputs={"choice": ["ab", "cd"]})
    )
    assert out[0].outputs[0].text in ("ab", "cd")  # the engine's lossy default steps aside
    assert sedac.engine.counters["sedac_lossy_tokens"] == 0


@pytest.fixture(scope="module")
def drafting(tiny_sedac_engine):
    llm = LLM(str(tiny_sedac_engine), device="cpu")
    always_draft(llm.engine)
    return llm


@pytest.mark.parametrize(
    "constraint", [{"json": SCHEMA}, {"regex": r"[a-c]{3}-\d{2}"}, {"grammar": 'root ::= "(" [0-9] ("+" [0-9])* ")"'}]
)
def test_lossless_drafts_under_a_grammar_match_off(drafting, constraint):
    """Lossless mode with drafts really made: drafts and targets are masked by the grammar's state after
    each draft prefix, so greedy constrained output is token-identical to off, and sampled output stays in
    the language. Without the verify masks (monkeypatched below) the outputs differ, so this can fail."""

    def run(mode, temperature=0.0):
        params = SamplingParams(
            max_tokens=40,
            temperature=temperature,
            seed=5,
            n=2 if temperature else 1,
            sedac_mode=mode,
            structured_outputs=constraint,
        )
        return drafting.generate(PROMPTS, params)

    counters = drafting.engine.counters
    off = run("off")
    before = counters["sedac_drafted_tokens"], counters["sedac_accepted_tokens"]
    lossless = run("lossless")
    assert [o.outputs[0].token_ids for o in lossless] == [o.outputs[0].token_ids for o in off]
    assert counters["sedac_drafted_tokens"] > before[0] and counters["sedac_accepted_tokens"] > before[1]
    for out in run("lossless", temperature=1.0):
        for o in out.outputs:
            assert o.finish_reason == "length" or _in_language(constraint, o.text), o.text
    assert not drafting.engine.structured.matchers


def test_lossless_verify_needs_the_draft_masks(drafting, monkeypatch):
    params = SamplingParams(max_tokens=40, temperature=0.0, structured_outputs={"json": SCHEMA})
    off = [o.outputs[0].token_ids for o in drafting.generate(PROMPTS, params)]
    monkeypatch.setattr(drafting.engine.structured, "mask_after_drafts", lambda logits, seq, drafts: logits)
    unmasked = drafting.generate(
        PROMPTS,
        SamplingParams(max_tokens=40, temperature=0.0, sedac_mode="lossless", structured_outputs={"json": SCHEMA}),
    )
    assert [o.outputs[0].token_ids for o in unmasked] != off


def _in_language(constraint: dict, text: str) -> bool:
    if "json" in constraint:
        return _valid(json.loads(text))
    pattern = constraint.get("regex") or r"\(\d(\+\d)*\)"
    return re.fullmatch(pattern, text) is not None


def test_server_response_format_structured_outputs_and_guided(tiny_llama):
    with sedac_server(tiny_llama, "--served-model-name", "tiny") as (base, _):
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "A record, please."}]
        fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
        r = c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=64, temperature=0, n=2, response_format=fmt
        )
        assert all(_valid(json.loads(choice.message.content)) for choice in r.choices)
        r = c.completions.create(
            model="tiny",
            prompt="x",
            max_tokens=10,
            temperature=0,
            extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
        )
        assert r.choices[0].text in ("yes", "no")
        stream = c.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            extra_body={"guided_regex": r"\d{4}"},
        )
        assert re.fullmatch(r"\d{4}", "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
        for body, message in (
            ({"response_format": {"type": "json_schema", "json_schema": {}}}, "json_schema.schema"),
            ({"response_format": {"type": "yaml"}}, "response_format type"),
            ({"guided_regex": "(", "structured_outputs": {"regex": "a"}}, "give one of"),
            ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex is invalid"),
        ):
            with pytest.raises(openai.BadRequestError, match=re.escape(message)):
                c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, extra_body=body)
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason == "length"  # and the server still serves


def test_real_model_fills_a_schema_with_sensible_values(real_engine):
    llm = LLM(str(real_engine), kv_cache_memory=1 << 28)
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
    }
    out = llm.chat(
        [[{"role": "user", "content": "What is the capital of France? Answer in JSON with city and country."}]],
        SamplingParams(max_tokens=60, temperature=0.0, structured_outputs={"json": schema}),
    )[0].outputs[0]
    record = json.loads(out.text)
    assert set(record) == {"city", "country"} and "Paris" in record["city"]


REAL_SCHEMAS = [
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "age"],
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
    },
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["answer", "confidence"],
        "properties": {
            "answer": {"enum": ["yes", "no", "unsure"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
    },
    {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "string", "maxLength": 20}},
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["title", "tags", "draft"],
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "draft": {"type": "boolean"},
            "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 12}},
        },
    },
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["city", "location"],
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "location": {
                "type": "object",
                "additionalProperties": False,
                "required": ["lat", "lon"],
                "properties": {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                },
            },
        },
    },
]
REAL_PROMPTS = ["Describe a person you know.", "Is water wet?", "Name some fruits.", "Plan a blog post about tea."]


def test_real_server_json_schema_outputs_validate_for_20_pairs(real_engine):
    """response_format json_schema through the official client, 5 schemas x 4 prompts, each output checked
    with jsonschema."""
    import jsonschema

    with sedac_server(real_engine, "--served-model-name", "smol") as (base, _):
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        for i, schema in enumerate(REAL_SCHEMAS):
            fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
            for prompt in REAL_PROMPTS:
                r = c.chat.completions.create(
                    model="smol",
                    messages=[{"role": "user", "content": prompt}],
                    response_format=fmt,
                    max_tokens=120,
                    temperature=0,
                )
                choice = r.choices[0]
                assert choice.finish_reason == "stop", (schema, prompt, choice.message.content)
                jsonschema.validate(json.loads(choice.message.content), schema)
