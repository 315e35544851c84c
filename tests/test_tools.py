"""OpenAI tool calling: tool_choice required / named decode under a grammar, so the calls are always valid
JSON for the given tools (even from a random tiny model); auto parses <tool_call> blocks; templates without
tool support get the tools in the system message; bad tool requests are 400s naming the problem."""

import copy
import json

import openai
import pytest

from sedac.builder import build_engine
from sedac.config import BuildConfig
from sedac.serving.tools import Tool, ToolPlan
from tests.servers import sedac_server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "unit"],
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a city",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city"],
            "properties": {"city": {"type": "string", "maxLength": 12}},
        },
    },
}
ASK = [{"role": "user", "content": "What's the weather in Paris, in celsius?"}]


def _plan(choice="auto", parallel=True):
    return ToolPlan([Tool.model_validate(WEATHER), Tool.model_validate(CLOCK)], choice, parallel)


def _valid_call(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "get_weather":
        return set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit") and len(args["city"]) <= 12
    return name == "get_time" and set(args) == {"city"} and isinstance(args["city"], str)


def test_plan_errors_name_the_problem():
    with pytest.raises(ValueError, match="tool_choice names function 'nope', not one of the tools"):
        _plan({"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="tool_choice 'required' needs tools"):
        ToolPlan([], "required", True)
    with pytest.raises(ValueError, match="function names must be unique"):
        ToolPlan([Tool.model_validate(WEATHER)] * 2, "auto", True)


def test_auto_parses_tool_call_blocks_and_leaves_other_text():
    plan = _plan()
    text = (
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
        '</tool_call><tool_call>{"name": "unknown", "arguments": {}}</tool_call><tool_call>{broken</tool_call>'
    )
    content, calls = plan.parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo", "unit": "celsius"})]
    assert content.startswith("Let me check.")
    assert plan.parse("no calls here") == ("no calls here", [])
    assert _plan("required").parse('[{"name": "get_time", "arguments": {"city": "Rome"}}]')[1][0].name == "get_time"
    assert _plan("required").parse('[{"name": "get_ti')[1] == []  # cut off by max_tokens: text stays


def test_tools_go_where_the_template_renders_them(smollm2_tokenizer):
    def render(tokenizer):
        return lambda messages, tools: tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)

    plan = _plan()
    described = plan.messages(ASK, render(smollm2_tokenizer))  # SmolLM2's template ignores tools
    assert described[0]["role"] == "system" and "get_weather" in described[0]["content"] and described[1:] == ASK
    aware = copy.deepcopy(smollm2_tokenizer)
    aware.chat_template = (
        "{% if tools %}TOOLS {{ tools | tojson }}{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    assert plan.messages(ASK, render(aware)) == ASK  # the template's own rendering


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    engine = tmp_path_factory.mktemp("tools") / "tiny"  # room for the tools' system message
    build_engine(
        str(tiny_models["llama"]),
        engine,
        BuildConfig(max_batch_size=8, max_seq_len=1024, max_num_tokens=1024, kv_block_size=4),
    )
    with sedac_server(engine, "--served-model-name", "tiny") as (base, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_are_valid_for_the_tools(client, parallel):
    r = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=120,
        temperature=1.0,
        seed=4,
        n=3,
    )
    for choice in r.choices:
        if choice.finish_reason == "length":  # a random model may ramble past max_tokens
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        assert parallel or len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and _valid_call(call.function.name, call.function.arguments)
    assert any(c.finish_reason == "tool_calls" for c in r.choices)


def test_named_tool_streaming_and_a_tool_conversation(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, CLOCK], tool_choice=named, max_tokens=60, temperature=0
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and _valid_call("get_time", call.function.arguments)
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0, stream=True
    )
    deltas = [ch.choices[0] for ch in stream if ch.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert (
        calls
        and deltas[-1].finish_reason == "tool_calls"
        and _valid_call(calls[0].function.name, calls[0].function.arguments)
    )
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tool_requests_are_400s(client):
    cases = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "required"}, "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "constrains the output already",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ]
    for body, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, extra_body=body)
    with pytest.raises(openai.BadRequestError, match="needs content"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user"}], max_tokens=4)


def test_real_model_calls_the_right_tool(real_engine):
    with sedac_server(real_engine, "--served-model-name", "smol") as (base, _):
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        r = c.chat.completions.create(
            model="smol", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=80, temperature=0
        )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
