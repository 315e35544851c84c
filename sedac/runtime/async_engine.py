"""AsyncLLM: one engine loop on a background thread, shared by any number of asyncio callers.

The engine is only touched from its own thread; callers send commands through a queue and get
their outputs through per-request asyncio queues. A caller that stops iterating (a client that
disconnected) aborts its request, which frees its blocks at once.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from concurrent.futures import Future
from typing import AsyncIterator

from sedac.runtime.engine import LLMEngine
from sedac.runtime.outputs import RequestOutput
from sedac.runtime.sampling_params import SamplingParams


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later (HTTP 503)."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None):
        self.engine, self.max_queue = engine, max_queue
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="sedac-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any asyncio loop) ---------------------------------------------------------
    async def submit(self, prompt, params: SamplingParams, request_id: str | None = None,
                     on_finish=None) -> "RequestStream":
        """Add a request now (ValueError / QueueFullError raise here) and return its output stream;
        on_finish(output) runs once with the finished output."""
        rid = request_id or f"req-{next(self._ids)}"
        stream = RequestStream(self, rid, on_finish)
        await self._call(self._add, rid, prompt, params, asyncio.get_running_loop(), stream.queue)
        return stream

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they change; the last one has finished=True."""
        stream = await self.submit(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._commands.put((self._abort, (request_id,), None))

    async def stats(self) -> dict:
        return await self._call(self.engine.stats)

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout=30)

    async def _call(self, fn, *args):
        future: Future = Future()
        self._commands.put((fn, args, future))
        return await asyncio.wrap_future(future)

    # ---- engine thread --------------------------------------------------------------------------
    def _add(self, rid, prompt, params, loop, stream) -> None:
        if self.max_queue is not None and len(self.engine.scheduler.waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self.engine.scheduler.waiting)} requests are already waiting")
        self.engine.add_request(rid, prompt, params)
        self._streams[rid] = (loop, stream)

    def _abort(self, rid) -> None:
        self._streams.pop(rid, None)
        self.engine.abort_request(rid)

    def _run_command(self, command) -> None:
        fn, args, future = command
        try:
            result = fn(*args)
        except BaseException as e:            # the caller gets the exception; the loop goes on
            if future is not None:
                future.set_exception(e)
            return
        if future is not None:
            future.set_result(result)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                block = not self.engine.has_unfinished_requests()
                command = self._commands.get(block=block)
                if command is not None:
                    self._run_command(command)
                continue
            except queue.Empty:
                pass
            try:
                outputs = self.engine.step()
            except BaseException as e:        # a broken step fails the requests in flight, not the server
                self.error = e
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out) -> None:
        target = self._streams.get(out.request_id)
        if target is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        loop, stream = target
        loop.call_soon_threadsafe(stream.put_nowait, out)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self._streams):
            loop, stream = self._streams.pop(rid)
            self.engine.abort_request(rid)
            loop.call_soon_threadsafe(stream.put_nowait, RuntimeError(f"engine step failed: {error}"))


class RequestStream:
    """Async iterator over one request's outputs; abort() (or leaving early) cancels the request."""

    def __init__(self, owner: AsyncLLM, request_id: str, on_finish=None):
        self.owner, self.request_id, self.on_finish = owner, request_id, on_finish
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self.queue.get()
        if isinstance(out, BaseException):
            self.finished = True
            raise out
        self.finished = out.finished
        if self.finished and self.on_finish is not None:
            self.on_finish(out)
        return out

    async def final(self) -> RequestOutput:
        out = None
        try:
            async for out in self:
                pass
        finally:
            self.abort()
        return out

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.owner.abort(self.request_id)
