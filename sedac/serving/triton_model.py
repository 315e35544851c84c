"""The Triton Python-backend model written by `sedac-run triton export`: a decoupled model that feeds
every Triton request into one SEDAC engine loop (inflight batching across requests) and streams.

Tensor names and shapes follow the tensorrtllm_backend ensemble: [batch, 1] tensors (one prompt per
request, as its decoupled models take them) text_input, max_tokens, stream, temperature, top_k, top_p,
random_seed, repetition/presence/frequency penalties, stop_words, bad_words, end_id (a stop token),
pad_id (accepted; outputs are not padded), return_log_probs, exclude_input_in_output, beam_width (1) ->
text_output, cum_log_probs, output_log_probs; plus finish_reason, output_tokens and the SEDAC stats.
"""

from __future__ import annotations

import numpy as np

from sedac.runtime.async_engine import AsyncLLM
from sedac.runtime.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 64
_SCALARS = {
    "max_tokens": ("max_tokens", int),
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "random_seed": ("seed", int),
    "repetition_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "sedac_agreement": ("sedac_agreement", float),
    "thinking_token_budget": ("thinking_token_budget", int),
    "o1_max_branches": ("o1_max_branches", int),
    "o1_entropy_threshold": ("o1_entropy_threshold", float),
    "o1_probe_interval": ("o1_probe_interval", int),
    "o1_probe_certainty": ("o1_probe_certainty", int),
}
_STRING_FIELDS = ("sedac_mode", "o1_mode", "answer_regex")


class SedacTritonModel:
    def __init__(self, engine_dir: str, pb_utils):
        from sedac.runtime.engine import LLMEngine

        self.pb = pb_utils
        self.llm = AsyncLLM(LLMEngine(engine_dir, device="auto"))
        # Custom metrics on Triton's own /metrics endpoint, so the KV pool can be checked from outside.
        # The family must outlive its metrics (Triton refuses updates once it is collected).
        self.kv_family = pb_utils.MetricFamily(
            name="sedac_kv_blocks", description="SEDAC KV cache blocks", kind=pb_utils.MetricFamily.GAUGE
        )
        self.kv_free = self.kv_family.Metric(labels={"state": "free"})
        self.kv_total = self.kv_family.Metric(labels={"state": "total"})
        self.kv_total.set(self.llm.engine.blocks.num_blocks)
        self.kv_free.set(self.llm.engine.blocks.num_free_blocks)

    def execute(self, requests) -> None:
        for request in requests:
            self._start(request)

    def finalize(self) -> None:
        self.llm.shutdown()

    def _start(self, request) -> None:
        sender = request.get_response_sender()
        try:
            prompt, params, stream, echo = self._parse(request)
        except ValueError as e:
            self._send_error(sender, str(e))
            return
        self.llm.submit_nowait(prompt, params, self._sink(sender, stream, prompt if echo else ""))

    def _sink(self, sender, stream: bool, prefix: str):
        sent = 0
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def sink(item):
            nonlocal sent
            if isinstance(item, BaseException):
                self._send_error(sender, str(item))
                return
            text = item.outputs[0].text
            if item.finished:  # runs on the engine thread, between steps
                self.kv_free.set(self.llm.engine.blocks.num_free_blocks)
            if stream and (len(text) > sent or item.finished):
                sender.send(self._response(text[sent:], item), flags=final if item.finished else 0)
                sent = len(text)
            elif item.finished:  # like TensorRT-LLM, the prompt leads a non-streamed output unless excluded
                sender.send(self._response(prefix + text, item), flags=final)

        return sink

    def _send_error(self, sender, message: str) -> None:
        sender.send(
            self.pb.InferenceResponse(error=self.pb.TritonError(message)),
            flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )

    def _response(self, text: str, out):
        m, c = out.metrics, out.outputs[0]
        tensors = {
            "text_output": np.array([text.encode()], dtype=np.object_),
            "finish_reason": np.array([(out.finish_reason or "").encode()], dtype=np.object_),
            "output_tokens": np.array([len(out.token_ids)], dtype=np.int32),
            "layers_per_token": np.array([m.layers_per_token], dtype=np.float32),
            "sedac_skip_ratio": np.array([m.skip_ratio], dtype=np.float32),
        }
        if c.confidence is not None:  # o1 adaptive: the voted completion's confidence
            tensors["confidence"] = np.array([c.confidence], dtype=np.float32)
        if c.logprobs is not None:  # return_log_probs: the sampled tokens' log-probabilities
            token_logprobs = np.array([lp[t] for t, lp in zip(c.token_ids, c.logprobs)], dtype=np.float32)
            tensors["output_log_probs"] = token_logprobs
            tensors["cum_log_probs"] = np.array([token_logprobs.sum()], dtype=np.float32)
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(k, v[None]) for k, v in tensors.items()])

    def _parse(self, request):
        prompt = _strings(self._input(request, "text_input"))
        if len(prompt) != 1:
            raise ValueError(
                "text_input must hold exactly one string: one prompt per request (batch size 1), "
                "as tensorrtllm_backend's decoupled models take them; send rows as separate requests"
            )
        if (beams := self._input(request, "beam_width")) is not None and int(beams.reshape(-1)[0]) != 1:
            raise ValueError(
                f"beam_width {int(beams.reshape(-1)[0])} is not supported; beam search is not "
                "implemented, send beam_width 1 or leave it out"
            )
        fields = {"max_tokens": DEFAULT_MAX_TOKENS}
        for name, (field, kind) in _SCALARS.items():
            value = self._input(request, name)
            if value is not None:
                fields[field] = kind(value.reshape(-1)[0])
        for name, field in (("stop_words", "stop"), ("bad_words", "bad_words")):
            words = self._input(request, name)
            if words is not None:
                fields[field] = [w for w in _strings(words) if w]
        for name in _STRING_FIELDS:
            if (value := self._input(request, name)) is not None:
                fields[name] = _strings(value)[0]
        if (end_id := self._input(request, "end_id")) is not None:
            fields["stop_token_ids"] = [int(end_id.reshape(-1)[0])]
        if self._flag(request, "return_log_probs"):
            fields["logprobs"] = 0
        stream = self._flag(request, "stream")
        exclude = self._input(request, "exclude_input_in_output")
        echo = exclude is not None and not exclude.reshape(-1)[0]  # absent: the output only, as before
        return prompt[0], SamplingParams(**fields), stream, echo

    def _flag(self, request, name: str) -> bool:
        value = self._input(request, name)
        return bool(value is not None and value.reshape(-1)[0])

    def _input(self, request, name):
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()


def _strings(array) -> list[str]:
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    except UnicodeDecodeError:
        raise ValueError("string inputs must be valid UTF-8") from None
