"""Thinking budgets (vLLM's `thinking_token_budget`) and the reasoning / answer split of outputs.

A model's reasoning markers come from its chat template (`<think>` ... `</think>` where the template has
them) or from `sedac-build --reasoning-start TEXT --reasoning-end TEXT`, and live in the engine config.
Reasoning starts when the output emits the start marker, or at once when the prompt ends with it (a
template that opens the reasoning block). Each generated token inside it is counted; when a request's
budget is spent, the engine emits the end marker's tokens in place of what it would have sampled, and
the answer continues after it. The engine step calls this strategy (override before a token is taken,
observe after); outputs carry `reasoning` apart from the answer `text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REASONING_EFFORT = {"low": 128, "medium": 512, "high": 2048}  # OpenAI's reasoning_effort -> budget
UNLIMITED = 1 << 62  # the budget of a request whose reasoning is tracked without a limit (certainty probes)


@dataclass(frozen=True)
class ReasoningMarkers:
    start: str
    end: str

    def __post_init__(self):
        if not (isinstance(self.start, str) and isinstance(self.end, str) and self.start.strip() and self.end.strip()):
            raise ValueError("reasoning markers need a non-empty start and end (--reasoning-start, --reasoning-end)")

    @classmethod
    def from_template(cls, chat_template: str | None) -> "ReasoningMarkers | None":
        """<think> / </think> when the chat template uses them (Qwen3, DeepSeek-R1 and their kin)."""
        if chat_template and "<think>" in chat_template and "</think>" in chat_template:
            return cls("<think>", "</think>")
        return None


@dataclass
class _Budget:
    limit: int
    inside: bool  # generating reasoning now
    spent: int = 0
    done: bool = False  # the reasoning block has closed
    forced: list[int] = field(default_factory=list)  # end-marker tokens still to emit


class ThinkingBudgets:
    def __init__(self, tokenizer, markers: ReasoningMarkers | None):
        self.markers = markers
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        self.start_ids = encode(markers.start) if markers else []
        self.end_ids = encode(markers.end) if markers else []
        self.budgets: dict[object, _Budget] = {}  # Sequence -> its budget state
        self.exhausted = 0  # budgets that forced the end marker (a running total)

    def check(self, budget: int | None) -> None:
        if budget is not None and self.markers is None:
            raise ValueError(
                "thinking_token_budget needs a model with reasoning markers; this engine has none "
                "(rebuild it with sedac-build --reasoning-start TEXT --reasoning-end TEXT)"
            )

    def opened_by(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt ends with the start marker (a template that opens the reasoning block)."""
        return bool(self.start_ids) and prompt_ids[-len(self.start_ids) :] == self.start_ids

    def start(self, seq, budget: int, prompt_ids: list[int]) -> None:
        self.budgets[seq] = _Budget(budget, inside=self.opened_by(prompt_ids))
        self._close_if_spent(self.budgets[seq])

    def fork(self, parent, child) -> None:
        if parent in self.budgets:
            b = self.budgets[parent]
            self.budgets[child] = _Budget(b.limit, b.inside, b.spent, b.done, list(b.forced))

    def override(self, seq, token: int) -> int:
        """The token to take: the next end-marker token while a spent budget closes the block."""
        b = self.budgets.get(seq)
        return b.forced.pop(0) if b is not None and b.forced else token

    def observe(self, seq, output_ids: list[int]) -> None:
        """After a token is taken (output_ids ends with it): track the reasoning block and the budget."""
        b = self.budgets.get(seq)
        if b is None or b.done:
            return
        if not b.inside:
            if self.start_ids and output_ids[-len(self.start_ids) :] == self.start_ids:
                b.inside = True
                self._close_if_spent(b)
            return
        if output_ids[-len(self.end_ids) :] == self.end_ids:
            b.inside, b.done, b.forced = False, True, []
            return
        if not b.forced:
            b.spent += 1
            self._close_if_spent(b)

    def _close_if_spent(self, b: _Budget) -> None:
        if b.inside and b.spent >= b.limit and not b.forced:
            b.forced = list(self.end_ids)
            self.exhausted += 1

    def reasoning_tokens(self, seq) -> int | None:
        """Reasoning tokens seq has generated while its block is open; None outside the block."""
        b = self.budgets.get(seq)
        return b.spent if b is not None and b.inside and not b.forced else None

    def close(self, seq) -> bool:
        """End seq's reasoning block now: its next tokens are the end marker's (certainty probes agreed).
        False if the block is not open (closed already, or a spent budget is closing it)."""
        b = self.budgets.get(seq)
        if b is None or not b.inside or b.forced:
            return False
        b.forced = list(self.end_ids)
        return True

    def remaining(self, seq) -> int:
        """Reasoning tokens seq's budget still allows (UNLIMITED for a block tracked without a limit)."""
        b = self.budgets[seq]
        return max(0, b.limit - b.spent)

    def release(self, seq) -> None:
        self.budgets.pop(seq, None)

    def split(self, text: str, prompt_opened: bool) -> tuple[str | None, str]:
        """(reasoning, answer) of an output's text; (None, text) for an engine without markers."""
        if self.markers is None:
            return None, text
        start, end = self.markers.start, self.markers.end
        if not prompt_opened:
            if start not in text:
                return None, _held(text, start)
            before, text = text.split(start, 1)
        else:
            before = ""
        if end not in text:
            return _held(text, end), before  # still reasoning (or cut off by max_tokens)
        reasoning, after = text.split(end, 1)
        return reasoning, before + after.lstrip("\n")


def _held(text: str, marker: str) -> str:
    """text without a trailing partial marker, so streamed text never shows what becomes a marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text
