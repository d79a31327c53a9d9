"""The engine deployment: one replica = one `AsyncEngine` = one pipeline of stage actors, in the
replica's own placement group. The ingress (app.py) reaches it through a `DeploymentHandle`
(engine_handle.py); requests arrive as token ids, already validated and tokenized there.

Its methods are the wire of that handle: plain arguments and package dataclasses, no HTTP.
"""

from __future__ import annotations

from ray import serve

from ..config.engine_config import EngineConfig
from ..engine.sampling_params import SamplingParams
from .engine_hooks import EngineReports

QUEUED = "queued"  # generate's first item: the request is queued (a refusal raises instead)


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=10, health_check_timeout_s=60)
class JambaEngine(EngineReports):
    """Owns one AsyncEngine, whose stage actors live in this replica's placement group. Reports
    what it holds (prefix router) and what fills it (autoscaling): `EngineReports`."""

    def __init__(self, config: EngineConfig, model_name: str):
        from ..engine.async_engine import AsyncEngine

        self.model_name = model_name
        self.engine = AsyncEngine(config.with_options(in_current_group=True))

    async def generate(
        self,
        token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        task: str = "generate",
        cache_salt: str | None = None,
    ):
        """Streamed (`handle.options(stream=True)`): QUEUED once the engine took the request (its
        refusals raise before), then delta RequestOutputs. `token_ids` and `cache_salt` (the same
        as `params.cache_salt`) are plain arguments so that a request router can read them.
        A cancelled call (the client left, a timeout) aborts the request: its slot is freed."""
        stream = await self.engine.generate(token_ids, params, request_id, task)
        try:
            yield QUEUED
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def health(self, timeout_s: float = 60.0) -> dict:
        return await self.engine.health(timeout_s)

    async def stats(self) -> dict:
        ctx = serve.get_replica_context()
        where = {"deployment": ctx.deployment, "replica": ctx.replica_id.unique_id}
        return {**await self.engine.stats(), "engine": where}

    async def metrics(self, labels: str = "") -> str:
        """This pipeline's Prometheus text, each sample labelled with this replica (the ingress
        merges every replica's: `EngineHandle.metrics`)."""
        replica = f'replica="{serve.get_replica_context().replica_id.unique_id}"'
        return await self.engine.metrics(",".join(x for x in (labels, replica) if x))

    def model_card(self) -> dict:
        return self.engine.model_card()

    async def check_health(self) -> None:
        """Serve's periodic check. A recovery in progress passes (failing would have Serve kill the
        replica and every stream the recovery keeps alive), and a dead stage the probe finds
        starts one; only a pipeline that is broken and not recovering fails."""
        await self.engine.check(timeout_s=30)

    def __del__(self):
        try:
            self.engine.shutdown()
        except Exception:
            pass
