"""The Serve hooks an engine deployment (one replica = one pipeline) mixes in: what it holds for
the prefix router, and what fills it for autoscaling. Both read the engine's bookkeeping on the
replica's event loop, where the engine's step loop runs (no stage round trip)."""

from __future__ import annotations

from .autoscale import fill_metrics


class EngineReports:
    """Needs `self.engine` (an `AsyncEngine`)."""

    async def record_routing_stats(self) -> dict:
        return self.engine.routing_report().to_dict()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.engine.routing_report(limit=0).load
        # (the step size the engine runs: max_batched_tokens, or its device default)
        return fill_metrics(load, self.engine.core.config.batched_tokens)
