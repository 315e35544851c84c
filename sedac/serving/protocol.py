"""OpenAI request schemas (plus SEDAC extensions) and their mapping onto SamplingParams."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from sedac.runtime.reasoning import REASONING_EFFORT
from sedac.runtime.sampling_params import O1_BRANCHES, O1_MAX_BRANCHES, SamplingParams
from sedac.serving.tools import Tool, ToolPlan

# OpenAI / vLLM fields that would change the output but are not implemented yet: answered 400 naming the
# field, never silently ignored. A value that asks for nothing (the benign ones) passes.
UNSUPPORTED_FIELDS = {
    "tools": lambda v: not v,
    "functions": lambda v: not v,  # tools: chat requests declare them (below)
    "tool_choice": lambda v: v == "none",
    "function_call": lambda v: v == "none",
    "best_of": lambda v: v == 1,
    "use_beam_search": lambda v: v is False,
    "prompt_logprobs": lambda v: not v,
}
# vLLM's older names for structured_outputs' fields
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _json_integer(value):
    """A JSON integer: 3 or 3.0 (JSON Schema counts both), not true, "3" or 3.5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError("must be an integer")
    return int(value)


def _json_number(value):
    """A JSON number, not true or "1.0"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    return float(value)


# Constrained types: the schema in /openapi.json says what the server accepts, as far as a schema can (a
# prompt's fit in the context, token ids in the vocabulary and grammars are checked by the engine: 400).
StrictInt = Annotated[int, BeforeValidator(_json_integer)]
Number = Annotated[float, BeforeValidator(_json_number)]
Positive = Annotated[StrictInt, Field(ge=1)]
TokenId = Annotated[StrictInt, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
TokenIdKey = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,8})$")]  # OpenAI's logit_bias keys: token ids as strings
TopLogprobs = Annotated[StrictInt, Field(ge=0, le=20)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields that change nothing (user, metadata, ...)

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data):
        if isinstance(data, dict):
            for name, benign in UNSUPPORTED_FIELDS.items():
                if name not in cls.model_fields and data.get(name) is not None and not benign(data[name]):
                    raise ValueError(f"'{name}' is not supported by this server yet")
        return data

    model: str | None = None
    max_tokens: Positive | None = None
    max_completion_tokens: Positive | None = None  # the OpenAI SDK's current name; wins over max_tokens
    temperature: Number = Field(1.0, ge=0)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=-1)
    min_p: Number = Field(0.0, ge=0, le=1)
    n: Positive = 1  # at most the server's --max-n (checked by the server: 400)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] | None = None
    logit_bias: dict[TokenIdKey, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    min_tokens: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = Field(None, ge=0)
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    repetition_penalty: Number = Field(1.0, gt=0)
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: dict | None = None
    priority: StrictInt = 0
    sedac_mode: Literal["off", "lossless", "lossy"] | None = None
    sedac_agreement: Number | None = Field(None, gt=0, le=1)
    response_format: dict | None = None  # OpenAI: {"type": "text" | "json_object" | "json_schema", ...}
    structured_outputs: dict | None = None  # vLLM: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    thinking_token_budget: Positive | None = None  # vLLM: reasoning tokens before the end marker is forced
    reasoning_effort: Literal["low", "medium", "high"] | None = None  # OpenAI: mapped to a budget
    o1_mode: Literal["off", "adaptive"] | None = None  # adaptive: branch at uncertain tokens, answer by vote
    o1_max_branches: StrictInt = Field(O1_BRANCHES, ge=1, le=O1_MAX_BRANCHES)
    o1_entropy_threshold: Number | None = Field(None, ge=0)
    answer_regex: str | None = None
    o1_probe_interval: Positive | None = None  # reasoning models: a certainty probe every N reasoning tokens
    o1_probe_certainty: Positive = 3  # probes in a row that must agree to close the reasoning

    def sampling_params(self, default_max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises ValueError (-> HTTP 400) for values SamplingParams rejects."""
        extra = {
            k: v
            for k, v in (
                ("sedac_mode", self.sedac_mode),
                ("sedac_agreement", self.sedac_agreement),
                ("structured_outputs", self.structured()),
                ("thinking_token_budget", self.budget()),
                ("o1_mode", self.o1_mode),
                ("o1_entropy_threshold", self.o1_entropy_threshold),
                ("answer_regex", self.answer_regex),
                ("o1_probe_interval", self.o1_probe_interval),
            )
            if v is not None
        }
        return SamplingParams(
            max_tokens=self.requested_max_tokens if self.requested_max_tokens is not None else default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            n=self.n,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            seed=self.seed,
            logit_bias={int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            priority=self.priority,
            o1_max_branches=self.o1_max_branches,
            o1_probe_certainty=self.o1_probe_certainty,
            **extra,
        )

    def budget(self) -> int | None:
        if self.thinking_token_budget is not None and self.reasoning_effort is not None:
            raise ValueError("give thinking_token_budget or reasoning_effort, not both")
        return self.thinking_token_budget or (
            REASONING_EFFORT[self.reasoning_effort] if self.reasoning_effort else None
        )

    def structured(self) -> dict | None:
        """The one structured-outputs request among response_format, structured_outputs and guided_*."""
        given = {
            name: value
            for name, value in (
                ("response_format", _response_format(self.response_format)),
                ("structured_outputs", self.structured_outputs),
            )
            if value
        }
        guided = {
            field: getattr(self, name) for name, field in GUIDED_FIELDS.items() if getattr(self, name) is not None
        }
        if guided:
            given["guided_*"] = guided
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(given)}, not several")
        return next(iter(given.values()), None)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


def _response_format(value: dict | None) -> dict | None:
    """OpenAI's response_format as structured_outputs fields (None for plain text)."""
    if value is None or value.get("type") == "text":
        return None
    if value.get("type") == "json_object":
        return {"json_object": True}
    if value.get("type") == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema needs json_schema.schema, a JSON schema object")
        return {"json": schema}
    raise ValueError(f"response_format type must be text, json_object or json_schema, got {value.get('type')!r}")


class CompletionRequest(_Sampling):
    prompt: Text | TokenIds | Annotated[list[Text], Field(min_length=1)]
    logprobs: TopLogprobs | None = None
    echo: StrictBool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # content parts: text only (no image or audio input)
    tool_calls: list[dict] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn's answer to one

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs content (or, from the assistant, tool_calls)")
        return self

    def for_template(self) -> dict:
        """{role, content} with text parts joined, as chat templates take it; an assistant's tool calls as
        the <tool_call> blocks the model writes them in (sedac.serving.tools)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        for call in self.tool_calls or []:
            function = call.get("function") or {}
            arguments = function.get("arguments") or "{}"
            text += '<tool_call>{"name": %s, "arguments": %s}</tool_call>' % (
                json.dumps(function.get("name")),
                arguments,
            )
        return {"role": self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: StrictBool = True

    def tool_plan(self) -> ToolPlan | None:
        """What the tools ask for (None without tools); ValueError for a tool_choice that cannot be met."""
        if not self.tools and self.tool_choice in (None, "none"):
            return None
        return ToolPlan(self.tools or [], self.tool_choice or "auto", self.parallel_tool_calls)

    def structured(self) -> dict | None:
        plan = self.tool_plan()
        forced, asked = plan.structured_outputs() if plan else None, super().structured()
        if forced and asked:
            raise ValueError(
                "tool_choice required or a named tool constrains the output already; "
                "drop response_format / structured_outputs"
            )
        return forced or asked


class GenerateRequest(_Sampling):
    """The original SEDAC /generate body: a prompt and sampling fields (max_new_tokens accepted too)."""

    prompt: Text | TokenIds
    max_new_tokens: Positive | None = None


class BatchGenerateRequest(_Sampling):
    prompts: list[Text | TokenIds] = Field(min_length=1)
    max_new_tokens: Positive | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[TokenId]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body (OpenAI's error shape)."""

    error: ErrorDetail
