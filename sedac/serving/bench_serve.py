"""`sedac-run bench serve`: vLLM's `bench serve` against any OpenAI-compatible server (ours, llama.cpp's
llama-server, vLLM), with its datasets, arrival process and metric names.

Requests are streamed /v1/completions (prompt text, max_tokens, temperature 0, ignore_eos so each request
produces its planned output length). Arrivals: all at once (--request-rate inf) or a gamma process with
mean rate --request-rate and shape --burstiness (1 = Poisson), as vLLM draws them; --max-concurrency caps
requests in flight. Per request: TTFT (to the first token), ITL (between streamed chunks), TPOT ((E2EL -
TTFT) / (output tokens - 1)), E2EL; goodput counts requests within every --goodput SLO.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

GOODPUT_METRICS = ("ttft", "tpot", "e2el")  # the SLOs vLLM's --goodput takes


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class Result:
    ok: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def sharegpt_requests(tokenizer, num: int, output_len: int | None, max_prompt_len: int) -> list[BenchRequest]:
    """First user turns of the ShareGPT bench split; output length the recorded answer's (vLLM's default)
    unless output_len is given."""
    from sedac.builder.datasets import sharegpt_conversations

    out = []
    for messages in sharegpt_conversations("bench"):
        if len(messages) < 2:
            continue
        prompt_len = len(tokenizer.encode(messages[0]["content"], add_special_tokens=False))
        answer_len = output_len or len(tokenizer.encode(messages[1]["content"], add_special_tokens=False))
        if 4 <= prompt_len <= max_prompt_len and answer_len >= 4:
            out.append(BenchRequest(messages[0]["content"], prompt_len, min(answer_len, 1024)))
            if len(out) == num:
                return out
    raise ValueError(f"the ShareGPT bench split has only {len(out)} usable prompts of <= {max_prompt_len} tokens")


def random_requests(tokenizer, num: int, input_len: int, output_len: int, seed: int) -> list[BenchRequest]:
    """Random token ids decoded to text (vLLM's random dataset), re-encoded for the real prompt length."""
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    out = []
    for _ in range(num):
        text = tokenizer.decode(rng.choice(vocab, size=input_len).tolist())
        out.append(BenchRequest(text, len(tokenizer.encode(text, add_special_tokens=False)), output_len))
    return out


async def _send(http, url: str, model: str, request: BenchRequest, api_key: str | None) -> Result:
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result, start = Result(), time.perf_counter()
    last, chunks = start, 0
    try:
        async with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
    except Exception as e:  # counted as a failed request; the run goes on
        result.error = repr(e)
        return result
    result.e2el = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    return result


async def run_bench_serve(
    url: str,
    requests: list[BenchRequest],
    request_rate: float,
    burstiness: float,
    max_concurrency: int | None,
    goodput: dict[str, float],
    api_key: str | None,
    seed: int = 0,
) -> dict:
    import httpx

    url = url.rstrip("/")
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None)) as http:
        try:
            models = await http.get(
                url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
            )
            models.raise_for_status()
            model = models.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise ValueError(f"no OpenAI-compatible server answers /v1/models at {url}: {e}") from None
        limit = asyncio.Semaphore(max_concurrency or len(requests))

        async def limited(request):
            async with limit:
                return await _send(http, url, model, request, api_key)

        started, tasks = time.perf_counter(), []
        for request in requests:
            tasks.append(asyncio.create_task(limited(request)))
            if request_rate != float("inf"):  # gamma inter-arrival times: mean 1/rate, shape burstiness
                await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    return summarize(
        requests,
        results,
        duration,
        model,
        goodput,
        {"request_rate": request_rate, "burstiness": burstiness, "max_concurrency": max_concurrency},
    )


def summarize(requests, results: list[Result], duration: float, model: str, goodput: dict, settings: dict) -> dict:
    done = [(q, r) for q, r in zip(requests, results) if r.ok]
    inputs = sum(q.prompt_len for q, _ in done)
    outputs = sum(r.output_tokens for _, r in done)
    out = {
        "model": model,
        **settings,
        "Successful requests": len(done),
        "Failed requests": len(results) - len(done),
        "Benchmark duration (s)": round(duration, 2),
        "Total input tokens": inputs,
        "Total generated tokens": outputs,
        "Request throughput (req/s)": round(len(done) / duration, 3),
        "Output token throughput (tok/s)": round(outputs / duration, 2),
        "Total Token throughput (tok/s)": round((inputs + outputs) / duration, 2),
    }
    series = {
        "ttft": [r.ttft for _, r in done],
        "tpot": [r.tpot for _, r in done if r.tpot is not None],
        "itl": [t for _, r in done for t in r.itl],
        "e2el": [r.e2el for _, r in done],
    }
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
    for key, values in series.items():
        ms = [1000 * v for v in values] or [0.0]
        out[f"Mean {names[key]} (ms)"] = round(statistics.fmean(ms), 2)
        out[f"Median {names[key]} (ms)"] = round(statistics.median(ms), 2)
        out[f"P99 {names[key]} (ms)"] = round(float(np.percentile(ms, 99)), 2)
    if goodput:
        good = sum(
            all(1000 * getattr(r, k) <= limit for k, limit in goodput.items() if getattr(r, k) is not None)
            for _, r in done
        )
        out["Request goodput (req/s)"] = round(good / duration, 3)
    out["errors"] = [r.error for r in results if not r.ok][:3]
    # the raw per-request values behind the percentiles, for the report's distributions
    out["per_request_ms"] = {key: _ms(series[key]) for key in ("ttft", "tpot", "e2el")}
    out["per_request_ms"]["itl"] = [_ms(r.itl) for _, r in done]
    return out


def _ms(seconds: list[float]) -> list[float]:
    return [round(1000 * s, 3) for s in seconds]


def parse_goodput(items: tuple[str, ...]) -> dict[str, float]:
    """("ttft:500", "tpot:50") -> {"ttft": 500.0, "tpot": 50.0} (milliseconds), vLLM's --goodput syntax."""
    slo = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in GOODPUT_METRICS or not value:
            raise ValueError(f"--goodput takes METRIC:MS with METRIC one of {', '.join(GOODPUT_METRICS)}, got {item!r}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
    return slo


def markdown(result: dict) -> str:
    rows = [(k, v) for k, v in result.items() if k not in ("errors", "per_request_ms")]
    return "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def figures(result: dict) -> dict:
    """TTFT, TPOT and ITL distributions, and the run's token throughput (one run: one rate, one concurrency)."""
    from sedac.cli.report import grouped_bars, histograms

    per_request = result["per_request_ms"]
    latency = histograms(
        f"Latency distributions ({result['Successful requests']} requests)",
        [
            ("TTFT (ms)", "requests (count)", per_request["ttft"]),
            ("TPOT (ms)", "requests (count)", per_request["tpot"]),
            ("ITL (ms)", "token gaps (count)", [t for gaps in per_request["itl"] for t in gaps]),
        ],
    )
    concurrency = result["max_concurrency"] or "unlimited"
    throughput = grouped_bars(
        f"Token throughput at request rate {result['request_rate']} req/s, max concurrency {concurrency}",
        "throughput (tokens counted)",
        "tokens/s",
        ["output tokens", "input + output tokens"],
        {"throughput": [result["Output token throughput (tok/s)"], result["Total Token throughput (tok/s)"]]},
    )
    return {"latency": latency, "throughput": throughput}


SWEEP_COLUMNS = (
    "Successful requests",
    "Output token throughput (tok/s)",
    "Total Token throughput (tok/s)",
    "Median TTFT (ms)",
    "Median TPOT (ms)",
    "P99 ITL (ms)",
)


def sweep_markdown(results: list[dict]) -> str:
    """One row per concurrency level of a sweep (each level's full metrics are in report.json)."""
    head = "| max concurrency | " + " | ".join(SWEEP_COLUMNS) + " |\n" + "|---" * (len(SWEEP_COLUMNS) + 1) + "|\n"
    return (
        head
        + "\n".join(
            f"| {r['max_concurrency']} | " + " | ".join(str(r[c]) for c in SWEEP_COLUMNS) + " |" for r in results
        )
        + "\n"
    )


def sweep_figures(results: list[dict]) -> dict:
    """Throughput and median latencies against concurrency, and the busiest level's latency distributions."""
    from sedac.cli.report import lines

    levels = [r["max_concurrency"] for r in results]
    throughput = lines(
        "Token throughput vs concurrency",
        "max concurrency (requests in flight)",
        "tokens/s",
        levels,
        {
            "output tokens": [r["Output token throughput (tok/s)"] for r in results],
            "input + output tokens": [r["Total Token throughput (tok/s)"] for r in results],
        },
    )
    latency = lines(
        "Median latencies vs concurrency",
        "max concurrency (requests in flight)",
        "latency (ms)",
        levels,
        {"TTFT": [r["Median TTFT (ms)"] for r in results], "TPOT": [r["Median TPOT (ms)"] for r in results]},
    )
    busiest = figures(results[-1])["latency"]
    return {"throughput_vs_concurrency": throughput, "latency_vs_concurrency": latency, "latency": busiest}
