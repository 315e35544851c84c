"""SamplingParams with vLLM / TensorRT-LLM field names; invalid values raise ValueError at once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sedac.runtime.structured_outputs import StructuredOutputsParams

SEDAC_MODES = ("off", "lossless", "lossy")
SEDAC_KV_FILLS = ("deferred", "propagate", "ghost")  # engine-wide: how depth exits fill deeper KV
SEDAC_LOSSY_EXITS = ("precision", "depth")  # engine-wide: where lossy mode's tokens exit
O1_MODES = ("off", "adaptive")  # adaptive: branch at uncertain tokens, answer by vote (o1.py)
# o1_max_branches: its default and its largest value. On the tuning seed's 60 questions (`sedac-run bench --o1`,
# 2026-11-30) 3 to 8 branches all kept greedy's accuracy (0.77) while tokens grew from 1.47x to 2.12x greedy's;
# 4 stays well inside the 2x budget.
O1_BRANCHES, O1_MAX_BRANCHES = 4, 64


def check_sedac_mode(mode: str | None) -> None:
    if mode is not None and mode not in SEDAC_MODES:
        raise ValueError(f"sedac_mode must be off, lossless or lossy, got {mode!r}")


def check_o1(mode: str | None, max_branches: int, threshold: float | None, answer_regex: str | None) -> None:
    """Field checks of SamplingParams' o1 fields (ValueError on any bad value)."""
    if mode is not None and mode not in O1_MODES:
        raise ValueError(f"o1_mode must be off or adaptive, got {mode!r}")
    if isinstance(max_branches, bool) or not isinstance(max_branches, int) or not 1 <= max_branches <= O1_MAX_BRANCHES:
        raise ValueError(f"o1_max_branches must be an integer in [1, {O1_MAX_BRANCHES}], got {max_branches!r}")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0
    ):
        raise ValueError(f"o1_entropy_threshold must be a number >= 0 (nats), got {threshold!r}")
    if answer_regex is not None:
        try:
            re.compile(answer_regex)
        except (re.error, TypeError) as e:
            raise ValueError(f"answer_regex is not a valid regular expression: {e}") from None


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)  # never generated (as in vLLM / TRT-LLM bad_words)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: [-100, 100])
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings wait until this many outputs (vLLM)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # number of top logprobs per token (the sampled one is always included)
    priority: int = 0  # lower runs first (vLLM convention); FCFS among equals
    skip_special_tokens: bool = True
    sedac_mode: str | None = None  # "off", "lossless" or "lossy"; None = the engine's default
    sedac_agreement: float | None = None  # lossy mode's target token agreement with the full model
    structured_outputs: StructuredOutputsParams | dict | None = None  # vLLM's name: json, regex, choice, grammar
    thinking_token_budget: int | None = None  # vLLM's name: reasoning tokens before the end marker is forced
    o1_mode: str | None = None  # "off" or "adaptive" (branch at uncertain tokens, vote); None = the engine's
    o1_max_branches: int = O1_BRANCHES  # adaptive: sequences per request, the first one included
    o1_entropy_threshold: float | None = None  # adaptive: entropy (nats) above which a token branches
    answer_regex: str | None = None  # adaptive: what a branch answers (last match, its first group if any)
    o1_probe_interval: int | None = None  # reasoning models: a certainty probe every N reasoning tokens
    o1_probe_certainty: int = 3  # reasoning closes once this many probes in a row give the same answer

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop or []), list(self.stop_token_ids or [])
        self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words or [])
        if self.top_k == -1:
            self.top_k = 0
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("n", self.n, 1)
        _check_int("top_k", self.top_k, 0)
        _check_int("priority", self.priority, None)
        _check_num("temperature", self.temperature, 0.0, None)
        _check_num("top_p", self.top_p, 0.0, 1.0, open_low=True)
        _check_num("min_p", self.min_p, 0.0, 1.0)
        _check_num("repetition_penalty", self.repetition_penalty, 0.0, None, open_low=True)
        _check_num("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_num("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
            if self.logprobs > 20:
                raise ValueError("logprobs must be at most 20")
        for name in ("stop", "bad_words"):
            if not all(isinstance(s, str) and s for s in getattr(self, name)):
                raise ValueError(f"{name} must be a list of non-empty strings")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens and self.structured_outputs is not None:
            raise ValueError("min_tokens does not take structured_outputs (a grammar ends where its text is complete)")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must be a dict of token id -> bias")
            for token, bias in self.logit_bias.items():
                _check_int("logit_bias token id", token, 0)
                _check_num(f"logit_bias[{token}]", bias, -100.0, 100.0)
        if self.thinking_token_budget is not None:
            _check_int("thinking_token_budget", self.thinking_token_budget, 1)
        check_sedac_mode(self.sedac_mode)
        check_o1(self.o1_mode, self.o1_max_branches, self.o1_entropy_threshold, self.answer_regex)
        if self.o1_mode == "adaptive" and self.o1_blocker:
            raise ValueError(f"o1_mode adaptive does not take {self.o1_blocker}")
        if self.o1_mode == "off" and (
            (self.answer_regex is not None and self.o1_probe_interval is None)
            or self.o1_entropy_threshold is not None
            or self.o1_max_branches != O1_BRANCHES
        ):
            raise ValueError(
                "o1_max_branches, o1_entropy_threshold and answer_regex apply to o1_mode adaptive only "
                "(answer_regex also to o1_probe_interval)"
            )
        self._validate_probes()
        if self.sedac_agreement is not None:
            _check_num("sedac_agreement", self.sedac_agreement, 0.0, 1.0, open_low=True)

    def _validate_probes(self) -> None:
        if self.o1_probe_interval is None:
            if self.o1_probe_certainty != 3:
                raise ValueError("o1_probe_certainty applies with o1_probe_interval")
            return
        _check_int("o1_probe_interval", self.o1_probe_interval, 1)
        _check_int("o1_probe_certainty", self.o1_probe_certainty, 1)
        if self.n > 1 or self.structured_outputs is not None:
            raise ValueError("o1_probe_interval takes n = 1 and no structured_outputs (a probe answers for one answer)")

    def sedac_blocker(self, mode: str | None) -> str | None:
        """The field that keeps this request off SEDAC mode `mode` (it then runs off), if any: lossy exits
        are not grammar-aware (lossless drafts and verification are), and neither mode is budget- or
        branch-aware yet."""
        if mode in (None, "off"):
            return None
        if self.structured_outputs is not None and mode == "lossy":
            return "structured_outputs"
        if self.o1_mode == "adaptive":
            return "o1_mode adaptive"
        if self.o1_probe_interval is not None:
            return "o1_probe_interval"
        return "thinking_token_budget" if self.thinking_token_budget is not None else None

    @property
    def o1_blocker(self) -> str | None:
        """What adaptive compute cannot run with: it returns one voted completion, a grammar's state does
        not fork mid-generation yet, and certainty probes and branches do not mix yet."""
        if self.n > 1:
            return "n > 1 (it returns one voted completion)"
        if self.o1_probe_interval is not None:
            return "o1_probe_interval"
        return "structured_outputs" if self.structured_outputs is not None else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_num(name, value, low, high, open_low=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (value <= low if open_low else value < low) or (high is not None and value > high):
        bound = (
            f"in ({low}, {high}]"
            if open_low and high is not None
            else (f"in [{low}, {high}]" if high is not None else f"> {low}" if open_low else f">= {low}")
        )
        raise ValueError(f"{name} must be {bound}, got {value}")
