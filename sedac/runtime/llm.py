"""The offline Python API: `LLM(engine_dir).generate(prompts, params)`, chat and stream."""

from __future__ import annotations

import itertools
from typing import Iterator
from typing import Sequence as Seq

from tqdm import tqdm

from sedac.runtime.engine import LLMEngine
from sedac.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sedac.runtime.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, engine_dir: str, device: str = "auto", **engine_kwargs):
        self.engine = LLMEngine(engine_dir, device=device, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A single bad prompt raises ValueError; in a list, a bad
        prompt yields an output with finish_reason "error" and `.error` while the others complete."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompt_list = [prompts] if single else list(prompts)
        param_list = _broadcast(params, len(prompt_list))
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompt_list, param_list):
            rid = f"gen-{next(self._ids)}"
            order.append(rid)
            try:
                self.engine.add_request(rid, prompt, p)
            except ValueError as e:
                if single:
                    raise
                results[rid] = _error_output(rid, prompt, str(e))
        bar = tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[rid] for rid in order]

    def chat(
        self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None, use_tqdm: bool = False
    ) -> list[RequestOutput]:
        """Apply the engine's chat template; one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:
            raise ValueError(f"invalid chat messages: {e}") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one request as they are generated (aborts it if the caller stops)."""
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, prompt, params)
        sent, finished = 0, False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        text, finished = out.outputs[0].text, out.finished
                        if len(text) > sent:
                            yield text[sent:]
                            sent = len(text)
        finally:
            if not finished:
                self.engine.abort_request(rid)


def _broadcast(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
    return params


def _error_output(rid: str, prompt, message: str) -> RequestOutput:
    return RequestOutput(
        rid,
        prompt if isinstance(prompt, str) else None,
        [],
        [CompletionOutput(0, "", [], "error")],
        True,
        RequestMetrics(0.0),
        error=message,
    )
