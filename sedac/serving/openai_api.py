"""OpenAI-compatible /v1/completions and /v1/chat/completions (streaming via SSE, n, logprobs, usage)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from sedac.serving.protocol import ChatCompletionRequest, CompletionRequest


class OpenAIHandlers:
    def __init__(self, server):
        self.server = server  # sedac.serving.app.Server: engine access, validation, metrics

    # ---- completions ----------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest):
        prompts = (
            [req.prompt]
            if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int))
            else list(req.prompt)
        )
        params = self.server.params(req, default_max_tokens=16, logprobs=req.logprobs, prompts=len(prompts))
        streams = [await self.server.submit(p, params) for p in self.server.tokenized(prompts, params)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return _sse(self._completion_chunks(streams, rid, created, req))
        finals = await asyncio.gather(*(s.final() for s in streams))
        choices = [
            {
                "index": i * params.n + c.index,
                "text": (f.prompt or "") * req.echo + c.text,
                "logprobs": self._completion_logprobs(c) if req.logprobs is not None else None,
                "finish_reason": c.finish_reason,
                **_confidence(c),
            }
            for i, f in enumerate(finals)
            for c in f.outputs
        ]
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.server.model_name,
                "choices": choices,
                "usage": _usage(finals),
            }
        )

    async def _completion_chunks(self, streams, rid, created, req) -> AsyncIterator[dict]:
        finals, sent = [], {}
        async for i, out in _merge(streams):
            for c, delta in _deltas(out, sent):
                yield {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.server.model_name,
                    "choices": [
                        {
                            "index": i * req.n + c.index,
                            "text": delta,
                            "logprobs": None,
                            "finish_reason": c.finish_reason,
                            **_confidence(c),
                        }
                    ],
                }
            if out.finished:
                finals.append(out)
        if req.include_usage:
            yield {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.server.model_name,
                "choices": [],
                "usage": _usage(finals),
            }

    def _completion_logprobs(self, c) -> dict:
        tok = self.server.tokenizer
        tokens = [tok.decode([t]) for t in c.token_ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp[t] for t, lp in zip(c.token_ids, c.logprobs)],
            "top_logprobs": [{tok.decode([k]): v for k, v in lp.items()} for lp in c.logprobs],
            "text_offset": offsets,
        }

    # ---- chat -----------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        plan = self.server.tool_plan(req)
        messages = [m.for_template() for m in req.messages]
        if plan is not None:
            messages = plan.messages(messages, self.server.render)
        ids = self.server.chat_prompt(messages, plan.template_tools() if plan else None)
        params = self.server.params(req, default_max_tokens=self.server.room_after(len(ids)), logprobs=logprobs)
        stream = await self.server.submit(self.server.tokenized([ids], params)[0], params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return _sse(self._chat_chunks(stream, rid, created, req, plan))
        final = await stream.final()
        choices = [
            {
                "index": c.index,
                **_message(c, plan),
                "logprobs": self._chat_logprobs(c) if req.logprobs else None,
                **_confidence(c),
            }
            for c in final.outputs
        ]
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self.server.model_name,
                "choices": choices,
                "usage": _usage([final]),
            }
        )

    async def _chat_chunks(self, stream, rid, created, req, plan) -> AsyncIterator[dict]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.server.model_name}
        for i in range(req.n):
            yield {
                **head,
                "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
            }
        final, sent, thought = None, {}, {}
        async for _, out in _merge([stream]):
            for c, delta in _deltas(out, thought, lambda c: c.reasoning or ""):  # its own delta field (vLLM's)
                if delta:
                    yield {
                        **head,
                        "choices": [
                            {"index": c.index, "delta": {"reasoning": delta}, "logprobs": None, "finish_reason": None}
                        ],
                    }
            for c, delta in _deltas(out, sent, lambda c: c.answer):
                if plan is not None and plan.active:  # tool calls are parsed from the whole text: sent at the end
                    if c.finish_reason:
                        message = _message(c, plan)
                        calls = [
                            {"index": k, **call} for k, call in enumerate(message["message"].get("tool_calls", []))
                        ]
                        delta = {"content": message["message"]["content"]} | ({"tool_calls": calls} if calls else {})
                        yield {
                            **head,
                            "choices": [
                                {
                                    "index": c.index,
                                    "delta": delta,
                                    "logprobs": None,
                                    "finish_reason": message["finish_reason"],
                                }
                            ],
                        }
                    continue
                yield {
                    **head,
                    "choices": [
                        {
                            "index": c.index,
                            "delta": {"content": delta} if delta else {},
                            "logprobs": None,
                            "finish_reason": c.finish_reason,
                            **_confidence(c),
                        }
                    ],
                }
            final = out
        if req.include_usage and final is not None:
            yield {**head, "choices": [], "usage": _usage([final])}

    def _chat_logprobs(self, c) -> dict:
        tok = self.server.tokenizer

        def entry(token_id, logprob):
            text = tok.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in lp.items() if k != t]}
                for t, lp in zip(c.token_ids, c.logprobs)
            ]
        }


def _message(c, plan) -> dict:
    """{"message", "finish_reason"} of a finished choice: its text, or the tool calls parsed from it
    (finish_reason "tool_calls", as OpenAI reports them unless a named tool was forced)."""
    reasoning = {"reasoning": c.reasoning} if c.reasoning is not None else {}
    if plan is None or not plan.active:
        return {"message": {"role": "assistant", "content": c.answer, **reasoning}, "finish_reason": c.finish_reason}
    content, calls = plan.parse(c.answer)
    message = {"role": "assistant", "content": content, **reasoning}
    if not calls:
        return {"message": message, "finish_reason": c.finish_reason}
    message["tool_calls"] = [call.openai() for call in calls]
    return {"message": message, "finish_reason": "tool_calls" if plan.choice != "named" else c.finish_reason}


async def _merge(streams) -> AsyncIterator[tuple[int, object]]:
    """Interleave request streams as outputs arrive, tagged with the stream's index; leaving early
    (a client that disconnected) aborts every request still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out = await queue.get()
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


def _deltas(out, sent: dict, text_of=lambda c: c.text):
    """(choice, new text) pairs since this stream's last output; `sent` belongs to one response and one
    text_of (the raw text, a chat answer, its reasoning)."""
    for c in out.outputs:
        key, text = (out.request_id, c.index), text_of(c)
        done = sent.get(key, 0)
        if done is None:  # this choice already sent its finish chunk
            continue
        if len(text) > done or c.finish_reason:
            yield c, text[done:]
        sent[key] = None if c.finish_reason else len(text)


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _confidence(c) -> dict:
    """o1 adaptive requests report the voted completion's confidence beside it."""
    return {} if c.confidence is None else {"confidence": c.confidence}


def _usage(finals) -> dict:
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(c.token_ids) for f in finals for c in f.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
