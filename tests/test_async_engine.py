"""AsyncLLM: concurrent callers share one engine loop; early exit aborts; a full queue refuses."""

import asyncio

import pytest

from sedac import LLM, SamplingParams
from sedac.runtime.async_engine import AsyncLLM, QueueFullError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), device="cpu")


async def collect(engine, prompt, params=GREEDY):
    last = None
    async for out in engine.generate(prompt, params):
        last = out
    return last


def test_concurrent_requests_match_offline(llm, tiny_llama):
    prompts = [list(range(5, 5 + n)) for n in range(1, 17)]
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    engine = AsyncLLM(LLM(str(tiny_llama), device="cpu").engine)

    async def main():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    try:
        outs = asyncio.run(main())
        assert [o.token_ids for o in outs] == expected and all(o.finished for o in outs)
        stats = asyncio.run(engine.stats())
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    finally:
        engine.shutdown()


def test_early_exit_aborts_and_bad_request_fails_alone(tiny_llama):
    engine = AsyncLLM(LLM(str(tiny_llama), device="cpu").engine)

    async def leave_early():
        async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)):
            break

    async def main():
        with pytest.raises(ValueError, match="max_seq_len"):
            await collect(engine, list(range(400)))
        await leave_early()
        return await collect(engine, [4, 5, 6])

    try:
        assert asyncio.run(main()).finished
        stats = asyncio.run(engine.stats())
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_requests_running"] == 0
    finally:
        engine.shutdown()


def test_full_queue_refuses(tiny_llama):
    engine = AsyncLLM(LLM(str(tiny_llama), device="cpu", max_num_seqs=1).engine, max_queue=1)

    async def main():
        with pytest.raises(QueueFullError):
            await asyncio.gather(*(collect(engine, [i + 1] * 5) for i in range(4)))

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_cancelled_callers_leave_the_engine_serving(tiny_llama):
    """Callers cancelled while their add waits for the engine thread (a client gone, asyncio.run
    tearing down a gather) must neither kill the engine thread nor leave orphan requests running."""
    engine = AsyncLLM(LLM(str(tiny_llama), device="cpu").engine)
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        busy = asyncio.create_task(
            collect(engine, [1, 2, 3], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
        )
        await asyncio.sleep(0.05)
        for delay in (0, 0, 0.001, 0.002, 0.005):  # cancelled before, while and after the add runs
            task = asyncio.create_task(collect(engine, [4, 5, 6], long))
            await asyncio.sleep(delay)
            task.cancel()
        await busy
        return await collect(engine, [7, 8, 9])

    try:
        assert asyncio.run(asyncio.wait_for(main(), timeout=60)).finished  # a dead engine thread hangs: bound it
        assert engine._thread.is_alive()
        stats = asyncio.run(engine.stats())
        assert stats["num_requests_running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    finally:
        engine.shutdown()
