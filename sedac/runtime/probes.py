"""Certainty probes (Dynasor-CoT, as TensorRT-LLM's scaffolding runs it) for reasoning models.

Every `o1_probe_interval` reasoning tokens a request forks a probe: its reasoning so far, the end marker and
an answer cue, decoded greedily for a few tokens on the request's KV blocks (copy-on-write, so the probe
costs only its own tokens). Once the last `o1_probe_certainty` probes give the same non-empty answer, the
reasoning block is closed (the end marker is emitted, as a spent thinking budget does) and the answer
follows. Probes are never returned; their count and tokens go to metrics.o1_probes and metrics.o1_tokens.
The engine step calls this strategy: due after a token is taken, probe to fork, finished when a sequence ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sedac.runtime import detokenizer
from sedac.runtime.o1 import extract_answer
from sedac.runtime.request import allowance
from sedac.runtime.sampling_params import SamplingParams

PROBE_CUE = "\n\nThe final answer is "  # after the end marker: what a probe completes
PROBE_TOKENS = 16  # a probe's answer, at most (it also stops at the end of its line)


@dataclass
class _Watch:
    """A request's main sequence under probing."""

    interval: int
    certainty: int
    answer_regex: str | None
    answers: list[str] = field(default_factory=list)  # finished probes' answers, in order
    running: list = field(default_factory=list)  # its probes still decoding
    probes: int = 0
    tokens: int = 0  # tokens the probes generated
    settled: bool = False  # its probes agreed: reasoning closed


class CertaintyProbes:
    def __init__(self, tokenizer, reasoning, max_seq_len: int):
        self.reasoning = reasoning  # ThinkingBudgets: the reasoning block's state and its end marker
        self.cue_ids = reasoning.end_ids + tokenizer.encode(PROBE_CUE, add_special_tokens=False)
        self.max_seq_len = max_seq_len
        self.watched: dict = {}  # main Sequence -> _Watch
        self.parents: dict = {}  # probe Sequence -> main Sequence
        self.done: dict[str, _Watch] = {}  # request id -> the watch of its finished main sequence
        # o1_probe_tokens_saved: what reasoning closed by agreeing probes was still allowed (its thinking
        # budget, max_tokens and the context: an upper bound)
        self.counters = {"o1_probes": 0, "o1_probe_stops": 0, "o1_probe_tokens_saved": 0}

    def check(self, params) -> None:
        if params.o1_probe_interval is not None and self.reasoning.markers is None:
            raise ValueError(
                "o1_probe_interval needs a model with reasoning markers; this engine has none "
                "(rebuild it with sedac-build --reasoning-start TEXT --reasoning-end TEXT)"
            )

    def start(self, seq, params) -> None:
        self.watched[seq] = _Watch(params.o1_probe_interval, params.o1_probe_certainty, params.answer_regex)

    def due(self, seq) -> bool:
        """After seq took a token: whether a probe forks now (every interval reasoning tokens, until settled)."""
        watch = self.watched.get(seq)
        if watch is None or watch.settled:
            return False
        spent = self.reasoning.reasoning_tokens(seq)
        room = seq.num_tokens + len(self.cue_ids) < self.max_seq_len  # the cue and one answer token must fit
        return spent is not None and spent > 0 and spent % watch.interval == 0 and room

    def probe(self, seq, index: int):
        """A probe of seq: a branch sharing its blocks, with the end marker and the answer cue appended
        (computed as a short prefill chunk) and its own greedy parameters; its output is the answer only."""
        child = seq.branch(index)
        # greedy, the full model, the request's priority; none of the request's bans or held stops
        child.params = SamplingParams(
            max_tokens=PROBE_TOKENS,
            temperature=0.0,
            stop=["\n"],
            sedac_mode="off",
            o1_mode="off",
            priority=seq.params.priority,
        )
        child.bad_words_ids, child.stop_ids = [], []
        child.token_ids += self.cue_ids
        child.num_prompt_tokens = child.num_tokens
        child.output_text, child.logprobs = "", []
        child.detok_state = detokenizer.start(child.num_tokens)
        watch = self.watched[seq]
        watch.running.append(child)
        watch.probes += 1
        self.parents[child] = seq
        self.counters["o1_probes"] += 1
        return child

    def finished(self, seq) -> list:
        """seq has ended. A probe: its answer is recorded, and once the last `certainty` answers agree its
        request's reasoning is closed. A main sequence: -> its probes still running (to abort)."""
        parent = self.parents.pop(seq, None)
        if parent is None:
            watch = self.watched.pop(seq, None)
            if watch is None:
                return []
            self.done[seq.request_id] = watch
            return list(watch.running)
        watch = self.watched.get(parent) or self.done[parent.request_id]
        watch.running.remove(seq)
        watch.tokens += seq.num_output_tokens
        if seq.finish_reason == "abort" or watch.settled:
            return []
        watch.answers.append(extract_answer(seq.output_text, watch.answer_regex))
        last = watch.answers[-watch.certainty :]
        if len(last) == watch.certainty and last[0] and len(set(last)) == 1:
            watch.settled = True
            if self.reasoning.close(parent):  # not if the block had closed (or was closing) already
                self.counters["o1_probe_stops"] += 1
                left = min(self.reasoning.remaining(parent), allowance(parent, self.max_seq_len))
                self.counters["o1_probe_tokens_saved"] += left
        return []

    def usage(self, request_id: str, seqs) -> tuple[int, int] | None:
        """(probes forked, tokens they generated) for a request that probes, else None."""
        watch = next((self.watched[s] for s in seqs if s in self.watched), None) or self.done.get(request_id)
        return None if watch is None else (watch.probes, watch.tokens)

    def release(self, request_id: str) -> None:
        self.done.pop(request_id, None)
