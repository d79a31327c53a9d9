"""`AsyncEngine`: the engine core driven from an asyncio loop, with one output stream per request.

It is the `EngineClient` the Serve fronts depend on (`engine/client.py`).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections.abc import AsyncIterator

from ..config.engine_config import EngineConfig
from ..errors import StageFailedError
from .core import EngineCore
from .messages import StepFailure
from .outputs import RequestOutput
from .prefix_report import REPORT_LIMIT, PrefixReport, build_report
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RequestStream:
    """Async iterator of one request's delta outputs; `aclose()` before the end aborts it."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.engine, self.request_id, self.queue = engine, request_id, queue
        self.done = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        try:
            item = await self.queue.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.done = item.finished
        return item

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.request_id)

    def __del__(self) -> None:
        if not self.done:
            try:
                self.engine.abort(self.request_id)
            except Exception:
                pass


class AsyncEngine:
    """Requests join and leave between steps; each gets an async stream of delta outputs."""

    def __init__(self, config: EngineConfig):
        self.core = EngineCore(config)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._probe: asyncio.Future | None = None  # the probe in flight: concurrent checks share it

    @property
    def tokenizer(self):
        return self.core.tokenizer

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        task: str = "generate",
    ) -> RequestStream:
        """Validate and queue now (errors raise here), then stream deltas until finished.

        Closing the stream early (client gone, task cancelled) aborts the request.
        """
        rid = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self.core.add_request(rid, prompt, params, queue.put_nowait, task)
        self._kick()
        return RequestStream(self, rid, queue)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._kick()

    def _kick(self) -> None:
        # A fresh context: the step loop serves every request and must not be cancelled (nor its
        # Ray tasks) with the request that happened to start it.
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), context=contextvars.Context())
        self._wake.set()

    async def _run(self) -> None:
        core = self.core
        while True:
            if not core.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await core.step_async()
                # a step that never awaited (the local backend) must still let streams read
                await asyncio.sleep(0)
            except Exception as e:  # a bug outside any one request: end them all, keep serving
                log.exception("engine step failed")
                for rid in list(core.outputs.requests):
                    core.fail_request(
                        rid, StageFailedError(f"engine step failed: {type(e).__name__}")
                    )
                core.in_flight.clear()
                core.kv.clear()  # what the dropped micro-batches saved or exported is unknown

    @property
    def recovering(self) -> bool:
        return self.core.recovery.pending

    async def probe(self, timeout_s: float = 60.0) -> None:
        """A one-token forward through every stage on the probe slot; raises if any fails."""
        if self.recovering:  # stages are being replaced or reconnected: a probe now would race that
            raise StageFailedError("the pipeline is recovering from a stage failure")
        if self._probe is None or self._probe.done():
            # one at a time: a compiled graph takes at most a few executions beyond the steps in
            # flight, and Serve's check, every ingress's /health and gRPC Health probe at once
            core = self.core
            handle = core.pipeline.probe(core.spec.bos_token_id or 0)
            self._probe = asyncio.ensure_future(core.pipeline.wait_async(handle))
        result = await asyncio.wait_for(asyncio.shield(self._probe), timeout_s)
        if isinstance(result, StepFailure):
            raise StageFailedError(f"health probe failed: {result.error}")

    async def health(self, timeout_s: float = 60.0) -> dict:
        """{"status": "recovering" | "ok", "stages", "probe_s"}: "recovering" while stages are
        being replaced (new work should go elsewhere); raises when a stage cannot compute."""
        stages = self.core.pipeline.num_stages
        if self.recovering:
            return {"status": "recovering", "stages": stages}
        t0 = time.perf_counter()
        await self.probe(timeout_s)
        return {"status": "ok", "stages": stages, "probe_s": time.perf_counter() - t0}

    async def check(self, timeout_s: float = 30.0) -> None:
        """Serve's health check: passes while a recovery is under way (failing would kill the
        streams it keeps alive); a dead stage found by the probe starts one; raises only for a
        pipeline that is broken and not recovering."""
        if self.recovering:
            return
        try:
            await self.probe(timeout_s)
        except (StageFailedError, TimeoutError):
            if not await asyncio.to_thread(self.core.pipeline.dead_stages):
                raise
            self.core.recovery.stage_died()
            self._kick()

    async def stats(self) -> dict:
        stages = await asyncio.to_thread(self.core.pipeline.stats)
        return {**self.core.stats_local(), "stages": stages}

    def routing_report(self, limit: int = REPORT_LIMIT) -> PrefixReport:
        """What this pipeline holds and how full it is (for a prefix-aware router and for
        autoscaling); engine-side only, no stage round trip."""
        return build_report(self.core.kv, self.core.scheduler, limit)

    async def metrics(self, labels: str = "") -> str:
        """`labels`: Prometheus labels on every sample (`model="a"` when an app serves several)."""
        return self.core.outputs.metrics.render(await self.stats(), labels)

    def model_card(self) -> dict:
        core = self.core
        return {
            "max_model_len": core.capacity.max_model_len,
            "stages": core.pipeline.num_stages,
            "max_num_seqs": core.capacity.max_num_seqs,
            "vocab_size": core.spec.vocab_size,
        }

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.core.shutdown()
