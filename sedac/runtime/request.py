"""A request inside the engine (its sequences, SEDAC costs, grammar), when its sequences stop, and the
RequestOutput built from it: the completions it returns (every sample, or an adaptive request's vote), text
held back while a stop string may still complete, reasoning split from the answer, and its metrics."""

from __future__ import annotations

from dataclasses import dataclass

from sedac.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sedac.runtime.sampling_params import SamplingParams
from sedac.runtime.sequence import Sequence


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    aborted: bool = False
    cost: float = 0.0  # passes spent on generated tokens, batch-1 full-pass units (sedac_steps)
    off_cost: float = 0.0  # what sedac_mode off would spend on the same tokens
    drafted: int = 0
    accepted: int = 0
    grammar: object = None  # the compiled grammar of a structured-outputs request

    def is_done(self) -> bool:
        """Every sequence finished and none still to fork (n > 1 forks after the prompt), or aborted."""
        return (self.aborted or len(self.seqs) >= self.params.n) and all(s.is_finished for s in self.seqs)


def allowance(seq: Sequence, max_seq_len: int) -> int:
    """Tokens seq may still generate: its max_tokens and the context both bound it."""
    return max(0, min(seq.params.max_tokens - seq.num_output_tokens, max_seq_len - seq.num_tokens))


def stop_reason(seq: Sequence, token: int, previous_len: int, eos_ids: set[int], max_seq_len: int):
    """Why seq stops after taking token ((finish_reason, stop_reason)), or None; a stop string found in
    the new text cuts the text there."""
    p = seq.params
    if seq.num_tokens >= max_seq_len:  # the context is full: nothing else can come after it
        return ("length", None)
    if seq.num_output_tokens < p.min_tokens:  # vLLM: no stop of any kind before min_tokens
        return ("length", None) if seq.num_output_tokens >= p.max_tokens else None
    if token in eos_ids and not p.ignore_eos:
        return ("stop", None)
    if token in p.stop_token_ids:
        return ("stop", token)
    for stop in p.stop:  # only where the new text could complete it
        at = seq.output_text.find(stop, max(0, previous_len - len(stop) + 1))
        if at != -1:
            seq.output_text = seq.output_text[:at]
            return ("stop", stop)
    return ("length", None) if seq.num_output_tokens >= p.max_tokens else None


class RequestOutputs:
    """Builds a request's RequestOutput (each step for streams, once at the end)."""

    def __init__(self, reasoning, o1, probes, num_layers: int):
        self.reasoning, self.o1, self.probes, self.num_layers = reasoning, o1, probes, num_layers

    def build(self, req: Request) -> RequestOutput:
        done = req.is_done()
        hold = max((len(s) for s in req.params.stop), default=1) - 1  # never stream a partial stop string
        outs, opened = [], self.reasoning.opened_by(req.prompt_token_ids)
        for seq, confidence in self._returned(req, done):
            text = (
                seq.output_text
                if seq.is_finished or not hold
                else seq.output_text[: max(0, len(seq.output_text) - hold)]
            )
            reasoning, content = self.reasoning.split(text, opened)
            outs.append(
                CompletionOutput(
                    0 if confidence is not None else seq.index,
                    text,
                    seq.output_token_ids,
                    seq.finish_reason,
                    list(seq.logprobs) if seq.params.logprobs is not None else None,
                    seq.stop_reason,
                    reasoning,
                    content,
                    confidence,
                )
            )
        if not outs:  # an adaptive request shows its voted completion only once it is done
            outs.append(CompletionOutput(0, "", []))
        req.metrics.num_generated_tokens = sum(s.num_output_tokens for s in req.seqs)
        if req.request_id in self.o1.trees:  # the returned completion's tokens; o1_tokens: all branches'
            req.metrics.o1_branches, req.metrics.o1_tokens = len(req.seqs) - 1, req.metrics.num_generated_tokens
            req.metrics.num_generated_tokens = len(outs[0].token_ids)
        probed = self.probes.usage(req.request_id, req.seqs)
        if probed is not None:  # certainty probes: their tokens count in o1_tokens, beside the completion's
            req.metrics.o1_probes, req.metrics.o1_tokens = probed[0], req.metrics.num_generated_tokens + probed[1]
        self._sedac_metrics(req)
        req.metrics.num_cached_tokens = req.seqs[0].num_cached_tokens
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, done, req.metrics)

    def _returned(self, req: Request, done: bool) -> list[tuple[Sequence, float | None]]:
        """(sequence, confidence) per completion to return: every sample, or an adaptive request's vote."""
        if req.request_id in self.o1.trees:
            return self.o1.returned(req.request_id, req.seqs, done)
        return [(seq, None) for seq in sorted(req.seqs, key=lambda s: s.index)]

    def _sedac_metrics(self, req: Request) -> None:
        num_layers, m = self.num_layers, req.metrics
        if m.num_generated_tokens and req.off_cost:  # negative when SEDAC spent more than off would
            m.skip_ratio = 1.0 - req.cost / req.off_cost
            m.layers_per_token = num_layers * req.cost / req.off_cost
        m.acceptance_rate = req.accepted / req.drafted if req.drafted else None
