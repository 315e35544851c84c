"""AsyncLLM: one engine loop on a background thread, shared by any number of asyncio callers.

The engine is only touched from its own thread; callers send commands through a queue and get
their outputs through per-request asyncio queues. A caller that stops iterating (a client that
disconnected) aborts its request, which frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from typing import AsyncIterator, Callable

from sedac.runtime.engine import LLMEngine
from sedac.runtime.outputs import RequestOutput
from sedac.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later (HTTP 503)."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None):
        self.engine, self.max_queue = engine, max_queue
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, Callable[[object], None]] = {}  # request id -> receives outputs / errors
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.ready = threading.Event()  # set once the engine has run a warm-up request
        self._thread = threading.Thread(target=self._loop, name="sedac-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any asyncio loop) ---------------------------------------------------------
    async def submit(
        self, prompt, params: SamplingParams, request_id: str | None = None, on_finish=None
    ) -> "RequestStream":
        """Add a request now (ValueError / QueueFullError raise here) and return its output stream;
        on_finish(output) runs once with the finished output."""
        rid = request_id or f"req-{next(self._ids)}"
        stream = RequestStream(self, rid, on_finish)
        loop = asyncio.get_running_loop()

        def sink(item):  # called on the engine thread
            loop.call_soon_threadsafe(stream.queue.put_nowait, item)

        try:
            await self._call(self._add, rid, prompt, params, sink)
        except asyncio.CancelledError:  # the caller left; if the add already ran, nobody would abort it
            self.abort(rid)
            raise
        return stream

    def submit_nowait(
        self, prompt, params: SamplingParams, sink: Callable[[object], None], request_id: str | None = None
    ) -> str:
        """For plain threads (the Triton model): sink(output) is called from the engine thread for
        each output, or sink(exception) once if the request is refused or fails."""
        rid = request_id or f"req-{next(self._ids)}"
        self._commands.put((self._add_or_report, (rid, prompt, params, sink), None))
        return rid

    async def generate(
        self, prompt, params: SamplingParams, request_id: str | None = None
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
    def _add(self, rid, prompt, params, sink) -> None:
        if self.max_queue is not None and len(self.engine.scheduler.waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self.engine.scheduler.waiting)} requests are already waiting")
        self.engine.add_request(rid, prompt, params)
        self._sinks[rid] = sink

    def _add_or_report(self, rid, prompt, params, sink) -> None:
        try:
            self._add(rid, prompt, params, sink)
        except (ValueError, QueueFullError) as e:
            sink(e)

    def _abort(self, rid) -> None:
        self._sinks.pop(rid, None)
        self.engine.abort_request(rid)

    def _run_command(self, command) -> None:
        fn, args, future = command
        if future is not None and not future.set_running_or_notify_cancel():
            return  # its caller was cancelled before it ran: nobody wants it
        try:
            result = fn(*args)
        except BaseException as e:  # the caller gets the exception; the loop goes on
            if future is not None:
                future.set_exception(e)
            return
        if future is not None:
            future.set_result(result)

    def _warm_up(self) -> None:
        """Warm the engine up before the server reports ready."""
        try:
            self.engine.warm_up()
        except Exception as e:  # a broken engine: readiness reports it
            self.error = e
            return
        self.ready.set()

    def _loop(self) -> None:
        self._warm_up()
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
            except BaseException as e:  # a broken step fails the requests in flight, not the server
                self.error = e
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out) -> None:
        sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
        if sink is None:
            return
        try:
            sink(out)
        except Exception:  # a broken receiver loses its request, not the engine loop
            logger.exception("output delivery failed for request %s; aborting it", out.request_id)
            self._abort(out.request_id)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self._sinks):
            sink = self._sinks.pop(rid)
            self.engine.abort_request(rid)
            sink(RuntimeError(f"engine step failed: {error}"))


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
