"""OpenAI request schemas (plus SEDAC extensions) and their mapping onto SamplingParams."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from sedac.runtime.sampling_params import SamplingParams


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None     # the OpenAI SDK's current name; wins over max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = 0
    min_p: float = 0.0
    n: StrictInt = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: dict | None = None
    priority: StrictInt = 0
    sedac_mode: Literal["off", "lossless", "lossy"] | None = None
    sedac_agreement: float | None = None

    def sampling_params(self, default_max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises ValueError (-> HTTP 400) for values SamplingParams rejects."""
        extra = {k: v for k, v in (("sedac_mode", self.sedac_mode), ("sedac_agreement", self.sedac_agreement))
                 if v is not None}
        return SamplingParams(
            max_tokens=self.requested_max_tokens if self.requested_max_tokens is not None else default_max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, n=self.n,
            stop=self.stop or [], stop_token_ids=self.stop_token_ids or [], seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos, logprobs=logprobs,
            priority=self.priority, **extra)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[StrictInt] | list[str]
    logprobs: StrictInt | None = None
    echo: StrictBool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


class GenerateRequest(_Sampling):
    """The original SEDAC /generate body: a prompt and sampling fields (max_new_tokens accepted too)."""
    prompt: str | list[StrictInt]
    max_new_tokens: StrictInt | None = None


class BatchGenerateRequest(_Sampling):
    prompts: list[str | list[StrictInt]] = Field(min_length=1)
    max_new_tokens: StrictInt | None = None
