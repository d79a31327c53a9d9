"""`AsyncEngine`: the engine core driven from an asyncio loop, with per-request output streams."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections.abc import AsyncIterator

import ray

from . import recovery
from .config import EngineConfig
from .engine import EngineCore
from .errors import StageFailedError
from .outputs import RequestOutput
from .sampling import SamplingParams

log = logging.getLogger(__name__)


class RequestStream:
    """Async iterator of one request's delta outputs; `aclose()` before the end aborts it."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.engine, self.request_id, self.queue = engine, request_id, queue
        self.finished = False
        self.closed = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            self.engine._streams.pop(self.request_id, None)
            raise item
        if item.finished:
            self.finished = True
            self.engine._streams.pop(self.request_id, None)
        return item

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine._streams.pop(self.request_id, None)
            if not self.finished:
                self.engine.abort(self.request_id)

    def __del__(self) -> None:
        if not self.closed and not self.finished:
            try:
                self.engine.abort(self.request_id)
            except Exception:
                pass


class AsyncEngine:
    """Requests join and leave between steps; each gets an async stream of delta outputs."""

    def __init__(self, config: EngineConfig, reap_every_s: float = 30.0):
        self.core = EngineCore(config)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._reaper_task: asyncio.Task | None = None
        self.reap_every_s = reap_every_s
        self._recovering = False
        self._streams: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.core.tokenizer

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Validate and queue now (errors raise here), then stream deltas until finished.

        Closing the stream early (client gone, task cancelled) aborts the request.
        """
        rid = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self.core.add_request(rid, prompt, params, queue.put_nowait)
        self._streams[rid] = queue
        self._kick()
        return RequestStream(self, rid, queue)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._kick()

    def _kick(self) -> None:
        loop = asyncio.get_running_loop()
        # Fresh contexts: the step loop serves every request, and must not be cancelled (nor its
        # Ray tasks) with the request that happened to start it.
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), context=contextvars.Context())
        if self._reaper_task is None or self._reaper_task.done():
            self._reaper_task = loop.create_task(self._reaper(self.reap_every_s), context=contextvars.Context())
        self._wake.set()

    async def _run(self) -> None:
        core = self.core
        while True:
            if not core.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            core.fill()
            if not core.in_flight:
                await asyncio.sleep(0.001)
                continue
            mb = core.in_flight[0]
            try:
                result = await mb.ref
            except ray.exceptions.RayError:
                await self._recover()
                continue
            core.in_flight.popleft()
            try:
                core.complete(mb, result)
            except Exception as e:  # a bug in postprocessing must end requests, not the step loop
                log.exception("postprocessing step %d failed", mb.message.step_id)
                recovery.fail_all(core, StageFailedError(f"postprocessing a step failed: {type(e).__name__}: {e}"))

    async def _recover(self) -> None:
        """Replace dead stages (in a thread: it waits on actor start-up), then replay here."""
        self._recovering = True
        try:
            await asyncio.to_thread(recovery.replace_dead_stages, self.core)
            recovery.replay(self.core)
        except StageFailedError as e:
            log.error("failing all requests: %s", e)
            recovery.fail_all(self.core, e)
        finally:
            self._recovering = False

    async def reap(self) -> int:
        """Release slots no live sequence owns; run periodically by the reaper loop."""
        stages = await asyncio.gather(*self.core.pipeline.stats_refs())
        return recovery.reap(self.core, list(stages))

    async def _reaper(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.reap()
            except Exception as e:  # a dead stage: recovery happens on the step path
                log.warning("reaper skipped a round: %s", type(e).__name__)

    async def probe(self, timeout_s: float = 60.0) -> None:
        """A one-token forward through every stage on the reserved probe slot; raises if any fails."""
        if self._recovering:  # stages are being replaced or reconnected: a probe now would race that
            raise StageFailedError("the pipeline is recovering from a stage failure")
        core = self.core
        await asyncio.wait_for(core.pipeline.probe(core.spec.bos_token_id or 0), timeout_s)

    async def stats(self) -> dict:
        stages = await asyncio.gather(*self.core.pipeline.stats_refs())
        return {**self.core.stats_local(), "stages": list(stages)}

    def shutdown(self) -> None:
        for task in (self._task, self._reaper_task):
            if task is not None:
                task.cancel()
        self.core.shutdown()
