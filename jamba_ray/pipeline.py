"""S stage actors in one placement group; each stage's output ref goes straight to the next stage."""

from __future__ import annotations

import contextvars
import logging
import os
from dataclasses import dataclass

import numpy as np
import ray
from ray.util.placement_group import (
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .errors import StageFailedError
from .planner import StagePlan
from .sequence import StepMessage
from .stage import Stage, StageSpec
from .transport import choose

log = logging.getLogger(__name__)

StageActor = ray.remote(Stage)


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


@dataclass(frozen=True, slots=True)
class Placement:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    strategy: str = "PACK"
    resources: tuple[tuple[str, float], ...] = ()
    ready_timeout_s: float = 600.0
    # Inside a Serve replica: stages go into the replica's own placement group, bundles 1..S
    # (bundle 0 holds the replica), so replica and stages are scheduled and torn down together.
    in_current_group: bool = False

    def bundle(self) -> dict[str, float]:
        b = {"CPU": self.num_cpus, **dict(self.resources)}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        return b


class Pipeline:
    def __init__(
        self,
        model: str,
        plans: list[StagePlan],
        slots: int,
        max_len: int,
        dtype: str = "float32",
        placement: Placement = Placement(),
        threads: int = 1,
        quantization: str | None = None,
        transport: str = "auto",
        decode_graphs: bool = False,
    ):
        self.num_stages = len(plans)
        self.placement = placement
        if placement.in_current_group:
            self.pg, self.bundle_offset = get_current_placement_group(), 1
            if self.pg is None:
                raise StageFailedError("in_current_group is set but this process has no placement group")
        else:
            self.pg, self.bundle_offset = placement_group(
                [placement.bundle()] * self.num_stages, strategy=placement.strategy
            ), 0
            self._wait(self.pg.ready(), "placement group for the stages")
        self.probe_slot = slots  # one extra slot, never scheduled, for health probes
        device = "cuda" if placement.num_gpus else "cpu"
        self.specs = [
            StageSpec(model, p.index, p.start, p.end, self.num_stages, slots + 1, max_len, dtype, device,
                      threads, quantization, decode_graphs)
            for p in plans
        ]
        self.stages = [self._start(spec) for spec in self.specs]
        self.info = self._wait([s.ready.remote() for s in self.stages], "stage start-up")
        self.transport = choose(transport, self.num_stages, device, placement.num_gpus)
        self.reconnect()

    def reconnect(self) -> None:
        """p2p: every stage joins one fresh group (after a replacement, or a link that lost step)."""
        if self.transport != "p2p":
            return
        address = self._wait(call(self.stages[0].rendezvous), "the stages' rendezvous address")
        self._wait([call(s.connect, address) for s in self.stages],
                   "the stages' p2p group (transport: object_store runs without one)")

    def _start(self, spec: StageSpec):
        strategy = PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=spec.index + self.bundle_offset
        )
        return StageActor.options(
            runtime_env={"env_vars": stage_env()},
            num_cpus=self.placement.num_cpus,
            num_gpus=self.placement.num_gpus,
            resources=dict(self.placement.resources),
            scheduling_strategy=strategy,
        ).remote(spec)

    def _wait(self, refs, what: str):
        try:
            return ray.get(refs, timeout=self.placement.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise StageFailedError(f"timed out waiting for {what}") from None
        except ray.exceptions.RayError as e:
            raise StageFailedError(f"{what} failed: {e}") from None

    def submit(self, msg: StepMessage, token_ids: list[int]):
        """Queue one micro-batch through every stage; returns the last stage's logits ref."""
        x = np.asarray(token_ids, dtype=np.int64)
        for stage in self.stages:
            x = call(stage.forward, msg, x)
        return x

    def dead_stages(self, timeout_s: float = 10.0) -> list[int]:
        """Indices of stages that no longer answer."""
        dead = []
        for i, ref in enumerate(self.ping()):
            try:
                ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(i)
        return dead

    def replace(self, indices: list[int]) -> None:
        """Start fresh actors for dead stages in their bundles (they load their slice again)."""
        for i in indices:
            try:
                ray.kill(self.stages[i])
            except Exception:
                pass
            self.stages[i] = self._start(self.specs[i])
        self._wait([call(self.stages[i].ready) for i in indices], "replacement stage start-up")
        self.reconnect()

    def release(self, slots: list[int]) -> None:
        if slots:
            for stage in self.stages:
                call(stage.release, slots)

    def fork(self, src: int, dsts: list[int], length: int) -> None:
        for stage in self.stages:
            call(stage.fork, src, dsts, length)

    def probe(self, token_id: int):
        """A one-token forward through every stage on the reserved probe slot; returns its ref."""
        from .sequence import Segment

        ref = self.submit(StepMessage(-1, (Segment(-1, self.probe_slot, 0, 1),)), [token_id])
        self.release([self.probe_slot])
        return ref

    def ping(self) -> list:
        return [call(s.ready) for s in self.stages]

    def stats_refs(self) -> list:
        return [call(s.stats) for s in self.stages]

    def stats(self) -> list[dict]:
        return self._wait(self.stats_refs(), "stage stats")

    def shutdown(self) -> None:
        for stage in self.stages:
            ray.kill(stage)
        if not self.placement.in_current_group:
            remove_placement_group(self.pg)
