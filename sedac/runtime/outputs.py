"""What generate/step return, with vLLM's field names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    layers_per_token: float = 0.0  # mean decoder layers run per generated token
    skip_ratio: float = 0.0  # fraction of layers SEDAC skipped (0 with sedac_mode off)
    acceptance_rate: float | None = None  # lossless mode's draft acceptance (None when no drafts ran)
    o1_branches: int = 0  # o1 adaptive: branches forked (beyond the first sequence)
    o1_tokens: int = 0  # o1: tokens generated over all branches and certainty probes
    o1_probes: int = 0  # certainty probes forked (o1_probe_interval)
    o1_early_stopped: bool = False  # o1 adaptive: the vote ended before every branch finished

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        if self.finish_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated_tokens - 1)

    def as_dict(self) -> dict:
        return {
            "ttft": self.ttft,
            "tpot": self.tpot,
            "e2e": self.e2e,
            "prompt_tokens": self.num_prompt_tokens,
            "generated_tokens": self.num_generated_tokens,
            "cached_tokens": self.num_cached_tokens,
            "layers_per_token": self.layers_per_token,
            "skip_ratio": self.skip_ratio,
            "acceptance_rate": self.acceptance_rate,
            "o1_branches": self.o1_branches,
            "o1_tokens": self.o1_tokens,
            "o1_early_stopped": self.o1_early_stopped,
            "o1_probes": self.o1_probes,
        }


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None
    reasoning: str | None = None  # the reasoning block's text (models with reasoning markers)
    content: str | None = None  # the answer: text without the reasoning block and its markers
    confidence: float | None = None  # o1 adaptive: confidence-weighted share of branches agreeing

    @property
    def answer(self) -> str:
        return self.text if self.content is None else self.content


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None

    # Single-sample conveniences, so `out.text` works as the API asks.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
