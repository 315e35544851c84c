"""The OpenAI-compatible server on loopback: official openai client, SSE, metrics, bad-input battery."""

import asyncio
import json
import signal
import threading

import httpx
import openai
import pytest

from sedac import LLM, SamplingParams
from tests.servers import sedac_server

PROMPT_IDS = [1, 520, 9531, 198, 33, 44]


@pytest.fixture(scope="module")
def server(tiny_llama):
    with sedac_server(tiny_llama, "--served-model-name", "tiny") as (base, proc):
        yield base


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(str(tiny_llama), device="cpu")


def client(base, **kw):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60, **kw)


def assert_pool_free(base):
    stats = httpx.get(base + "/stats", timeout=10).json()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_requests_running"] == 0


def test_models_and_completions_match_offline(server, offline):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(
        model="tiny", prompt=PROMPT_IDS, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    expected = offline.generate([PROMPT_IDS], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == len(PROMPT_IDS)


def test_chat_stream_and_n_and_logprobs(server, offline):
    c = client(server)
    msgs = [{"role": "user", "content": "Say hi"}]
    full = c.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len(full.choices[0].logprobs.content) == full.usage.completion_tokens
    many = c.completions.create(model="tiny", prompt="Hello", max_tokens=5, n=3, temperature=1.0, seed=5)
    assert sorted(ch.index for ch in many.choices) == [0, 1, 2]
    lp = c.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 3


def test_async_client_concurrent_streams(server, offline):
    prompts = [[7 + i, 8, 9, 10 + i] for i in range(12)]
    expected = [
        o.text for o in offline.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ]

    async def one(c, p):
        text = ""
        async for ch in await c.completions.create(
            model="tiny", prompt=p, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}
        ):
            text += ch.choices[0].text
        return text

    async def main():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)
        return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(main()) == expected
    assert_pool_free(server)


def test_native_endpoints_and_prometheus(server):
    r = httpx.post(server + "/generate", json={"prompt": "Hello", "max_new_tokens": 4, "temperature": 0}, timeout=30)
    assert r.status_code == 200 and len(r.json()["token_ids"]) >= 1
    r = httpx.post(server + "/batch_generate", json={"prompts": ["a", "x " * 400, "b"], "max_tokens": 3}, timeout=30)
    results = r.json()["results"]
    assert r.status_code == 200 and "error" in results[1] and "text" in results[0] and "text" in results[2]
    assert httpx.get(server + "/health").json()["status"] == "ok"
    text = httpx.get(server + "/metrics").text
    assert httpx.get(server + "/metrics/prometheus").text.splitlines()[0] == text.splitlines()[0]  # the alias
    for name in (
        "sedac:num_requests_running",
        "sedac:num_requests_waiting",
        "sedac:kv_cache_usage_perc",
        "sedac:prefix_cache_hit_rate",
        "sedac:time_to_first_token_seconds_bucket",
        "sedac:time_per_output_token_seconds_bucket",
        "sedac:e2e_request_latency_seconds_count",
        "sedac:prompt_tokens_total",
        "sedac:generation_tokens_total",
        "sedac:sedac_skip_ratio",
        "sedac:sedac_acceptance_rate",
        "sedac:num_preemptions_total",
        "sedac:prefix_cache_hits_total",
    ):
        assert name in text, name
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    assert types["sedac:prefix_cache_queries_total"] == types["sedac:num_preemptions_total"] == "counter"


BAD = [
    (b"{not json", 400),
    (b"\xff\xfe{}", 400),
    (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), 400),
    (json.dumps({"prompt": "hi", "max_tokens": -5}).encode(), 400),
    (json.dumps({"prompt": "hi", "max_tokens": 10**9}).encode(), 400),
    (json.dumps({"prompt": "word " * 400, "max_tokens": 5}).encode(), 400),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), 400),
    (json.dumps({"prompt": 5}).encode(), 400),
    (json.dumps({"prompt": "hi", "model": "gpt-17"}).encode(), 404),
    (json.dumps({"prompt": "hi", "sedac_mode": "lossy"}).encode(), 400),
    (b"x" * (10 * 1024 * 1024), 413),
    (b'{"prompt": "hi", "max_tokens": 2, "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    (b'{"prompt": "hi", "max_tokens": 2, "temperature": Infinity}', 400),
    (b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}', 400),
    (b'{"prompt": "hi", "max_tokens": 2, "top_p": 1e999}', 400),
    (json.dumps({"prompt": "hi", "max_tokens": 2, "n": 10**6}).encode(), 400),
    (json.dumps({"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": 101}}).encode(), 400),
    (json.dumps({"prompt": "hi", "max_tokens": 2, "logit_bias": {"five": 1}}).encode(), 400),
    (json.dumps({"prompt": "hi", "max_tokens": 2, "logit_bias": {"007": 1}}).encode(), 400),
    (json.dumps({"prompt": "hi", "max_tokens": 2, "logit_bias": {"999999": 1}}).encode(), 400),
    (json.dumps({"prompt": "hi", "max_tokens": 2, "min_tokens": 3}).encode(), 400),
    (json.dumps({"prompt": "hi", "max_tokens": 2, "best_of": 3}).encode(), 400),  # not silently ignored
    (json.dumps({"prompt": "hi", "max_tokens": 2, "response_format": {"type": "xml"}}).encode(), 400),
]


@pytest.mark.parametrize("body,status", BAD)
def test_bad_input_battery(server, body, status):
    r = httpx.post(server + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status
    assert r.json()["error"]["message"]
    ok = httpx.post(server + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_disconnect_mid_stream_frees_blocks(server):
    with httpx.stream(
        "POST",
        server + "/v1/completions",
        timeout=30,
        json={"prompt": "Hi", "max_tokens": 200, "stream": True, "ignore_eos": True},
    ) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data:"))
    # the connection is closed here, mid-stream: the server must abort the request
    for _ in range(100):
        stats = httpx.get(server + "/stats", timeout=10).json()
        if stats["num_requests_running"] == 0:
            break
        threading.Event().wait(0.1)
    assert_pool_free(server)
    assert httpx.post(server + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30).status_code == 200


def test_api_key_queue_limit_and_sigterm(tiny_llama):
    with sedac_server(tiny_llama, "--api-key", "sekret", "--max-queue", "1", "--max-num-seqs", "1") as (base, proc):
        assert httpx.post(base + "/v1/completions", json={"prompt": "hi"}).status_code == 401
        bad = httpx.post(base + "/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer no"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer sekret"}
        body = {"prompt": "hi", "max_tokens": 150, "ignore_eos": True}

        async def burst():
            async with httpx.AsyncClient(headers=auth, timeout=60) as c:
                return await asyncio.gather(*(c.post(base + "/v1/completions", json=body) for _ in range(6)))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert 200 in codes and 503 in codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "server_busy"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_client_cli_talks_to_server(server, offline):
    from click.testing import CliRunner

    from sedac.cli.run import main

    msgs = [{"role": "user", "content": "Hello"}]
    expected = offline.chat(msgs, SamplingParams(max_tokens=6, temperature=0))[0].text
    for flag in ("--stream", "--no-stream"):
        result = CliRunner().invoke(main, ["client", "--url", server, "--prompt", "Hello", "--max-tokens", "6", flag])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == expected.strip()
    bad = CliRunner().invoke(main, ["client", "--url", "ftp://x", "--prompt", "Hello"])
    assert bad.exit_code != 0 and "--url must start with" in bad.output


def test_bounded_load_run_has_no_errors(server):
    from click.testing import CliRunner

    from sedac.cli.run import main

    result = CliRunner().invoke(
        main, ["load", "--url", server, "--clients", "4", "--duration", "3", "--max-tokens", "8"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["errors"] == 0, report["first_errors"]
    assert report["requests"] >= 4 and report["ttft_p99_ms"] >= report["ttft_p50_ms"] > 0
    assert_pool_free(server)


def test_streamed_n_choices_finish_once_each(server):
    c = client(server)
    chunks = list(
        c.completions.create(model="tiny", prompt="Hello", max_tokens=6, n=3, temperature=1.0, seed=2, stream=True)
    )
    finishes = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    full = c.completions.create(model="tiny", prompt="Hello", max_tokens=6, n=3, temperature=1.0, seed=2)
    for choice in full.choices:
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == choice.index) == choice.text


def test_chat_without_max_tokens_gets_what_fits_and_max_completion_tokens(server):
    c = client(server)
    msgs = [{"role": "user", "content": "Tell me everything"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"  # vLLM's default: up to max_seq_len (256 here)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 256
    r = c.chat.completions.create(
        model="tiny",
        messages=msgs,
        temperature=0,
        max_completion_tokens=5,
        max_tokens=50,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5  # the current name wins over the old one
    assert_pool_free(server)


def test_content_parts_and_unsupported_fields_named(server):
    c = client(server)
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]
    as_parts = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": parts}],
        max_tokens=6,
        temperature=0,
        response_format={"type": "text"},
    )
    as_text = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="'tools' is not supported"):  # chat only
        c.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"tools": [tool]})
    with pytest.raises(openai.BadRequestError, match="'best_of' is not supported"):
        c.completions.create(model="tiny", prompt="hi", max_tokens=2, best_of=2)


def test_logit_bias_and_min_tokens(server, offline):
    c = client(server)
    biased = c.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0, logit_bias={"77": 100})
    assert biased.choices[0].text == offline.tokenizer.decode([77] * 3)
    eos = str(offline.engine.config.model.eos_token_ids[0])
    held = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=9,
        temperature=0,
        logit_bias={eos: 100},
        extra_body={"min_tokens": 5},
    )
    assert held.usage.completion_tokens == 6 and held.choices[0].finish_reason == "stop"


def test_tokenize_detokenize_version(server, offline):
    r = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}, timeout=30).json()
    assert r["tokens"] == offline.tokenizer.encode("Hello world", add_special_tokens=False)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    chat = httpx.post(server + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=30).json()
    assert chat["tokens"] == offline.apply_chat_template([{"role": "user", "content": "Hi"}])
    back = httpx.post(server + "/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert back["prompt"] == "Hello world"
    assert httpx.post(server + "/detokenize", json={"tokens": [-1]}, timeout=30).status_code == 400
    assert httpx.post(server + "/tokenize", json={"prompt": "a", "messages": []}, timeout=30).status_code == 400
    assert httpx.get(server + "/version", timeout=30).json()["version"]


def test_request_limits_are_configurable(tiny_llama):
    """--max-n, --max-tokens-cap and --max-body-bytes: a request over one is a 400 (413) naming it; a chat
    without max_tokens gets what fits under the cap."""
    with sedac_server(
        tiny_llama, "--served-model-name", "tiny", "--max-n", "2", "--max-tokens-cap", "5", "--max-body-bytes", "4096"
    ) as (base, _):
        c = client(base)
        with pytest.raises(openai.BadRequestError, match=r"n \(3\) x prompts \(1\) is over .* limit of 2 \(--max-n\)"):
            c.completions.create(model="tiny", prompt="hi", max_tokens=2, n=3)
        with pytest.raises(openai.BadRequestError, match=r"n \(1\) x prompts \(3\) is over"):  # a list fans out too
            c.completions.create(model="tiny", prompt=["a", "b", "c"], max_tokens=2)
        with pytest.raises(
            openai.BadRequestError, match=r"max_tokens \(6\) is over .* limit of 5 \(--max-tokens-cap\)"
        ):
            c.completions.create(model="tiny", prompt="hi", max_tokens=6)
        chat = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0, extra_body={"ignore_eos": True}
        )
        assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
        assert len(c.completions.create(model="tiny", prompt="hi", max_tokens=2, n=2).choices) == 2
        big = httpx.post(base + "/v1/completions", json={"prompt": "x" * 5000, "max_tokens": 2}, timeout=30)
        assert big.status_code == 413
        assert_pool_free(base)
