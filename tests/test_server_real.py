"""The real SmolLM2 engine behind the OpenAI server: 64 concurrent streams equal offline generation."""

import asyncio

import httpx
import openai
import pytest

from sedac import LLM, SamplingParams
from sedac.builder.datasets import sharegpt_conversations
from tests.servers import sedac_server

pytestmark = pytest.mark.slow


def test_64_concurrent_streams_equal_offline(real_engine):
    conversations = []
    for messages in sharegpt_conversations("bench"):
        if len(messages[0]["content"]) < 300:
            conversations.append(messages[:1])
        if len(conversations) == 64:
            break
    expected = [
        o.text
        for o in LLM(str(real_engine), device="cpu").chat(conversations, SamplingParams(max_tokens=16, temperature=0.0))
    ]

    async def one(client, messages):
        text = ""
        stream = await client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=16, temperature=0, stream=True
        )
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text

    with sedac_server(real_engine) as (base, _):

        async def main():
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
            return await asyncio.gather(*(one(client, m) for m in conversations))

        got = asyncio.run(main())
        stats = httpx.get(base + "/stats", timeout=10).json()
    assert got == expected
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["requests_finished"] == 64
