"""OpenAI tool calling: tools into the prompt, tool_choice into a grammar, the output into tool_calls.

- The chat template renders `tools` when it knows them (HF's `tools=` argument). A template without tool
  support (SmolLM2's) would drop them silently, so the tools and the calling convention then go into the
  system message instead: Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks.
- tool_choice "required": the output is constrained (structured outputs) to a JSON array of one or more
  calls to the given tools, each call's arguments valid against that tool's parameters schema (one call
  when parallel_tool_calls is false). A named tool: the output is that tool's arguments object (vLLM's
  behaviour). "auto": the model decides; `<tool_call>` blocks in its text are parsed into tool_calls
  (vLLM's hermes parser). "none": tools are not offered.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from pydantic import BaseModel

TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


class FunctionSpec(BaseModel):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    type: str = "function"
    function: FunctionSpec


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self) -> dict:
        return {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class ToolPlan:
    """The tools of one chat request and what its tool_choice asks for."""

    def __init__(self, tools: list[Tool], tool_choice, parallel_tool_calls: bool):
        self.tools = {t.function.name: t.function for t in tools}
        if any(t.type != "function" for t in tools):
            raise ValueError("tools: only type 'function' is supported")
        if len(self.tools) != len(tools):
            raise ValueError("tools: function names must be unique")
        self.named = None
        if isinstance(tool_choice, dict):
            self.named = (tool_choice.get("function") or {}).get("name")
            if tool_choice.get("type") != "function" or self.named not in self.tools:
                raise ValueError(
                    f"tool_choice names function {self.named!r}, not one of the tools "
                    f"({', '.join(self.tools) or 'none given'})"
                )
            self.choice = "named"
        elif tool_choice in ("none", "auto", "required"):
            self.choice = tool_choice
        else:
            raise ValueError("tool_choice must be none, auto, required or {type: function, function: {name}}")
        if self.choice != "none" and not self.tools:
            raise ValueError(f"tool_choice {self.choice!r} needs tools")
        self.parallel = parallel_tool_calls

    @property
    def active(self) -> bool:
        return self.choice != "none"

    def messages(self, messages: list[dict], render) -> list[dict]:
        """The conversation to render: as it is when the template renders tools itself (render(messages,
        tools) differs from render(messages, None)), else with the tools described in the system message."""
        if not self.active or render(messages, self.template_tools()) != render(messages, None):
            return messages
        described = "\n".join(json.dumps(f.model_dump(exclude_none=True)) for f in self.tools.values())
        note = (
            "You can call these functions:\n<tools>\n" + described + "\n</tools>\nTo call one, reply with "
            '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>, one block '
            "per call."
        )
        if messages[0]["role"] == "system":
            return [{"role": "system", "content": messages[0]["content"] + "\n\n" + note}, *messages[1:]]
        return [{"role": "system", "content": note}, *messages]

    def template_tools(self) -> list[dict] | None:
        return (
            [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in self.tools.values()]
            if self.active
            else None
        )

    def structured_outputs(self) -> dict | None:
        """The grammar required and named choices decode under (none for auto and none)."""
        if self.choice == "named":
            return {"json": self.tools[self.named].parameters or {"type": "object"}}
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "arguments"],
                "properties": {"name": {"const": name}, "arguments": f.parameters or {"type": "object"}},
            }
            for name, f in self.tools.items()
        ]
        return {
            "json": {
                "type": "array",
                "minItems": 1,
                **({} if self.parallel else {"maxItems": 1}),
                "items": {"anyOf": calls},
            }
        }

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output."""
        if self.choice == "named":
            return None, [ToolCall(self.named, text)]
        if self.choice == "required":
            try:
                return None, [ToolCall(c["name"], json.dumps(c["arguments"])) for c in json.loads(text)]
            except (json.JSONDecodeError, KeyError, TypeError):  # cut off by max_tokens
                return text, []
        if self.choice == "auto":
            calls = []
            for block in TOOL_CALL.findall(text):
                try:
                    call = json.loads(block)
                except json.JSONDecodeError:
                    continue
                if isinstance(call, dict) and call.get("name") in self.tools:
                    calls.append(ToolCall(call["name"], json.dumps(call.get("arguments", {}))))
            if calls:
                rest = TOOL_CALL.sub("", text).strip()
                return rest or None, calls
        return text, []
