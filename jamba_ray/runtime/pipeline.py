"""S stage actors in one placement group; each stage's output ref goes straight to the next stage.

This module and `placement.py` are the only ones that know Ray actors.
"""

from __future__ import annotations

import contextvars
import logging
import os

import numpy as np
import ray
from ray.util.placement_group import (
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..config.capacity import Capacity
from ..config.engine_config import EngineConfig
from ..config.planner import StagePlan
from ..engine.messages import StepFailure, StepMessage, StepResult
from ..errors import StageFailedError
from .placement import require_feasible, stage_bundle
from .stage import Stage, StageSpec, probe_message, sized, stage_specs
from .transport import choose

log = logging.getLogger(__name__)

StageActor = ray.remote(Stage)


def ensure_ray(address: str | None = None) -> None:
    """Join the running Ray cluster, or start a local one."""
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)


def call(method, *args):
    """Submit an actor task outside the caller's context.

    Inside a Serve replica, a task submitted while handling a request becomes that request's child
    and is cancelled with it when the client goes away. A cancelled stage task leaves a gap in the
    stage's ordered task queue, which then stalls; stage work belongs to the pipeline, not to one
    request, so it is always submitted from an empty context.
    """
    return contextvars.Context().run(method.remote, *args)


def stage_env() -> dict[str, str]:
    """OpenMP threads of an idle stage spin only briefly, then sleep: on shared cores the stages
    take turns, and a spinning idle stage would steal the busy one's core."""
    return {"GOMP_SPINCOUNT": os.environ.get("JAMBA_RAY_GOMP_SPINCOUNT", "20000")}


class RayPipeline:
    def __init__(
        self, config: EngineConfig, model: str, plans: list[StagePlan], eos_id: int | None
    ):
        ensure_ray()
        self.placement, self.num_stages = config.placement, len(plans)
        self.bundle = stage_bundle(config.placement, self.num_stages)
        self.timeout_s = config.placement.ready_timeout_s
        if self.placement.in_current_group:  # a Serve replica: bundle 0 holds the replica itself
            self.pg, self.offset = get_current_placement_group(), 1
            if self.pg is None:
                raise StageFailedError(
                    "in_current_group is set but this process has no placement group"
                )
        else:
            require_feasible(self.bundle, self.num_stages, self.placement.strategy)
            self.pg, self.offset = (
                placement_group([self.bundle] * self.num_stages, strategy=self.placement.strategy),
                0,
            )
            self._wait(self.pg.ready(), "the placement group for the stages")
        self.specs = stage_specs(config, model, plans, eos_id)
        self.stages = [self._start(spec) for spec in self.specs]
        self.info = self._wait([s.ready.remote() for s in self.stages], "stage start-up")
        self.transport = choose(
            config.compute.transport,
            self.num_stages,
            self.specs[0].device,
            self.placement.num_gpus_per_stage,
        )
        self.reconnect()

    def _start(self, spec: StageSpec):
        strategy = PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=spec.index + self.offset
        )
        return StageActor.options(
            runtime_env={"env_vars": stage_env()},
            num_cpus=self.bundle["CPU"],
            num_gpus=self.bundle.get("GPU", 0),
            scheduling_strategy=strategy,
            resources={k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")},
        ).remote(spec)

    def _wait(self, refs, what: str):
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise StageFailedError(
                f"timed out after {self.timeout_s:.0f}s waiting for {what}"
            ) from None
        except ray.exceptions.RayError as e:
            raise StageFailedError(f"{what} failed: {e}") from None

    def reconnect(self) -> None:
        """p2p: every stage joins one fresh group (after a replacement, or a link out of step)."""
        if self.transport != "p2p":
            return
        address = self._wait(call(self.stages[0].rendezvous), "the stages' rendezvous address")
        self._wait(
            [call(s.connect, address) for s in self.stages],
            "the stages' p2p group (transport: object_store runs without one)",
        )

    # ---- the pipeline protocol -----------------------------------------------------------------
    def submit(self, msg: StepMessage, token_ids: list[int]):
        x = np.asarray(token_ids, dtype=np.int64)
        for stage in self.stages:
            x = call(stage.forward, msg, x)
        return x

    def wait(self, handle) -> StepResult | StepFailure:
        try:
            return ray.get(handle)
        except ray.exceptions.RayError as e:
            return StepFailure(_summary(e))

    async def wait_async(self, handle) -> StepResult | StepFailure:
        try:
            return await handle
        except ray.exceptions.RayError as e:
            return StepFailure(_summary(e))

    def probe(self, token_id: int):
        return self.submit(probe_message(self.specs[0]), [token_id])

    def measure(self, utilization: float, tokens: int) -> int:
        refs = [call(s.measure, utilization, tokens) for s in self.stages]
        return min(self._wait(refs, "the stages' memory measurement"))

    def allocate(self, capacity: Capacity) -> None:
        """Size every stage's state pool (replacements start with these sizes)."""
        self.specs = [sized(spec, capacity) for spec in self.specs]
        refs = [call(s.allocate, spec) for s, spec in zip(self.stages, self.specs)]
        self._wait(refs, "the stages' state pools")

    def dead_stages(self, timeout_s: float = 10.0) -> list[int]:
        dead = []
        for i, stage in enumerate(self.stages):
            try:
                ray.get(call(stage.ready), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(i)
        return dead

    def replace(self, indices: list[int]) -> None:
        for i in indices:
            try:
                ray.kill(self.stages[i])
            except Exception:
                pass
            self.stages[i] = self._start(self.specs[i])
        self._wait([call(self.stages[i].ready) for i in indices], "replacement stage start-up")
        self.reconnect()

    def stats(self) -> list[dict]:
        return self._wait([call(s.stats) for s in self.stages], "stage stats")

    def shutdown(self) -> None:
        for stage in self.stages:
            ray.kill(stage)
        if not self.placement.in_current_group:
            remove_placement_group(self.pg)


def _summary(e: Exception) -> str:
    """The first line of a Ray error: the stage's exception, without Ray's traceback."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {cause}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__
