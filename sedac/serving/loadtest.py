"""`sedac-run load`: N streaming clients against a server for T seconds (bounded), trtllm-bench style stats."""

from __future__ import annotations

import asyncio
import itertools
import time

_TEMPLATE_TOKENS = 64  # room for the chat template around the user turn


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _client(client, model, prompts, deadline, max_tokens, stats) -> None:
    while time.perf_counter() < deadline:
        messages = next(prompts)
        start, first, tokens = time.perf_counter(), None, 0
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        except Exception as e:  # counted, reported, and the run goes on
            stats["errors"].append(repr(e))
            continue
        end = time.perf_counter()
        stats["ttft"].append((first or end) - start)
        if tokens > 1 and first is not None:
            stats["tpot"].append((end - first) / (tokens - 1))
        stats["tokens"] += tokens
        stats["requests"] += 1


async def run_load(
    url: str, clients: int, duration: float, max_tokens: int, api_key: str | None, conversations: list[list[dict]]
) -> dict:
    import openai

    client = openai.AsyncOpenAI(
        base_url=url.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0, timeout=max(60.0, duration * 4)
    )
    card = (await client.models.list()).data[0]
    model, budget = card.id, (getattr(card, "max_model_len", None) or 2048) - max_tokens - _TEMPLATE_TOKENS
    # Keep prompts that fit for sure (a BPE token covers at least one UTF-8 byte), so 400s are real errors.
    conversations = [m for m in conversations if len(m[0]["content"].encode()) <= budget]
    if not conversations:
        raise ValueError(f"no prompt fits the server's max_model_len with max_tokens={max_tokens}")
    stats = {"requests": 0, "tokens": 0, "ttft": [], "tpot": [], "errors": []}
    prompts = itertools.cycle(conversations)
    started = time.perf_counter()
    await asyncio.gather(
        *(_client(client, model, prompts, started + duration, max_tokens, stats) for _ in range(clients))
    )
    elapsed = time.perf_counter() - started
    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    return {
        "clients": clients,
        "duration_s": round(elapsed, 1),
        "requests": stats["requests"],
        "errors": len(stats["errors"]),
        "requests_per_s": round(stats["requests"] / elapsed, 2),
        "output_tok_per_s": round(stats["tokens"] / elapsed, 1),
        "ttft_p50_ms": ms(_percentile(stats["ttft"], 0.5)),
        "ttft_p99_ms": ms(_percentile(stats["ttft"], 0.99)),
        "tpot_p50_ms": ms(_percentile(stats["tpot"], 0.5)),
        "tpot_p99_ms": ms(_percentile(stats["tpot"], 0.99)),
        "mean_output_tokens": round(stats["tokens"] / max(1, stats["requests"]), 1),
        "first_errors": stats["errors"][:3],
    }
