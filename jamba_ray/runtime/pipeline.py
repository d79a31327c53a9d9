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
from .compiled import CompiledChain, GraphStep
from .placement import require_feasible, stage_bundle
from .snapshot import Snapshot
from .stage import Stage
from .stage_spec import StageSpec, default_threads, probe_message, sized, stage_specs
from .transport import StageError, choose

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


def stage_env(replacement: bool = False) -> dict[str, str]:
    """OpenMP threads of an idle stage spin only briefly, then sleep: on shared cores the stages
    take turns, and a spinning idle stage would steal the busy one's core.

    `JAMBA_RAY_REPLACEMENT_DELAY_S` (a test knob) makes replacement stages sleep that long before
    loading, as a real slice's minutes-long load would."""
    env = {"GOMP_SPINCOUNT": os.environ.get("JAMBA_RAY_GOMP_SPINCOUNT", "20000")}
    delay = os.environ.get("JAMBA_RAY_REPLACEMENT_DELAY_S")
    if replacement and delay:
        env["JAMBA_RAY_STAGE_START_DELAY_S"] = delay
    return env


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
        threads = default_threads(self.bundle["CPU"], self.num_stages, self.placement.strategy)
        self.specs = stage_specs(config, model, plans, eos_id, threads)
        self.snapshots = config.recovery.recovery_snapshots
        self.snapshot = [Snapshot() for _ in plans]  # per stage: what it exported, for a successor
        self._exports: dict[object, tuple[StepMessage, list[list]]] = {}  # by result handle
        self._last_exports: tuple[StepMessage, list[list]] | None = None
        self.stages = [self._start(spec) for spec in self.specs]
        self.info = self._wait([s.ready.remote() for s in self.stages], "stage start-up")
        self.transport = choose(
            config.compute.transport,
            self.num_stages,
            self.specs[0].device,
            self.placement.num_gpus_per_stage,
            per_task=config.state.prefix_tier,
        )
        self.chain: CompiledChain | None = None  # transport compiled: the stages' graph
        self.reconnect()

    def _start(self, spec: StageSpec, replacement: bool = False):
        strategy = PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=spec.index + self.offset
        )
        return StageActor.options(
            runtime_env={"env_vars": stage_env(replacement)},
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
        """p2p: every stage joins one fresh group (after a replacement, or a link out of step).
        compiled: the stages are bound into a graph again if it is gone (a stage died in it)."""
        if self.transport == "compiled":
            if self.chain is None or self.chain.broken:
                self._close_graph()
                own_gpu = self.specs[0].device == "cuda" and self.placement.num_gpus_per_stage >= 1
                try:  # one micro-batch per stage in flight, and a health probe on top
                    self.chain = CompiledChain(self.stages, self.num_stages + 2, own_gpu)
                except Exception as e:  # (a stage died: recovery looks for dead stages again)
                    error = f"compiling the stages' graph failed: {_summary(e)}"
                    raise StageFailedError(error) from None
            return
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
        if self.chain is not None:
            return self.chain.submit(msg, x)
        for stage in self.stages:
            x = call(stage.forward, msg, x)
        if msg.num_exports:  # this process calls for them, so it owns them: they outlive a stage
            n = msg.num_exports
            refs = [call(s.take_export.options(num_returns=n), msg.step_id) for s in self.stages]
            self._exports[x] = (msg, [r if n > 1 else [r] for r in refs])
        return x

    def wait(self, handle) -> StepResult | StepFailure:
        if isinstance(handle, GraphStep):
            try:
                return self._graph_landed(handle.msg, handle.chain.wait(handle))
            except Exception as e:  # (the graph failed or is gone: the step did not land)
                return StepFailure(_summary(e))
        exported = self._exports.pop(handle, None)
        try:
            return self._landed(exported, ray.get(handle))
        except ray.exceptions.RayError as e:
            return StepFailure(_summary(e))

    async def wait_async(self, handle) -> StepResult | StepFailure:
        if isinstance(handle, GraphStep):
            try:
                return self._graph_landed(handle.msg, await handle.chain.wait_async(handle))
            except Exception as e:
                return StepFailure(_summary(e))
        exported = self._exports.pop(handle, None)
        try:
            return self._landed(exported, await handle)
        except ray.exceptions.RayError as e:
            return StepFailure(_summary(e))

    def _landed(self, exported, result: StepResult) -> StepResult:
        """Every stage ran the step: what it exported is now its successor's to import."""
        self._last_exports = exported
        if exported is not None and self.snapshots:  # (a prefix tier exports without them)
            msg, refs = exported
            for snapshot, stage_refs in zip(self.snapshot, refs):
                snapshot.keep(msg, stage_refs)
        return result

    def _graph_landed(self, msg: StepMessage, outputs: list) -> StepResult | StepFailure:
        """A graph execution's outputs: the result, then each stage's exports (host copies, put
        in the object store so that this process owns them, as `take_export` returns do)."""
        result, *exports = outputs
        if isinstance(result, StageError):
            return StepFailure(result.error)
        refs = [[ray.put(item) for item in items] for items in exports] if msg.num_exports else []
        return self._landed((msg, refs) if refs else None, result)

    def landed_exports(self) -> tuple[StepMessage, list[list]] | None:
        """The exports of the step that landed last (read right after its wait): refs per
        stage, per item (the prefix tier publishes them)."""
        return self._last_exports

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

    def replace(self, indices: list[int], trusted: tuple[set[int], set[int]] | None = None) -> bool:
        self._exports.clear()  # (all of a failed step's: nothing is in flight now)
        self._close_graph()  # (before the stages change: it holds the survivors too)
        for i in indices:
            try:
                ray.kill(self.stages[i])
            except Exception:
                pass
            self.stages[i] = self._start(self.specs[i], replacement=True)
        self._wait([call(self.stages[i].ready) for i in indices], "replacement stage start-up")
        self.reconnect()
        if not self.snapshots or trusted is None:
            return False
        return all(self._import(i, trusted) for i in indices)

    def _import(self, i: int, trusted: tuple[set[int], set[int]]) -> bool:
        """Stage `i`'s replacement takes its predecessor's exports of the `trusted` ids (the
        others are dropped); False if one is missing or lost."""
        snapshot = self.snapshot[i]
        if not snapshot.keep_only(*trusted):
            log.error("stage %d's snapshot lacks ids the engine trusts; full replay", i)
            self.snapshot[i] = Snapshot()
            return False
        try:
            for ckpts, blocks, refs in snapshot.batches():
                self._wait(
                    call(self.stages[i].import_state, ckpts, blocks, *refs),
                    f"stage {i}'s snapshot import",
                )
        except StageFailedError as e:  # (an export lost, or the stage died before handing it)
            log.error("%s; its sequences replay in full", e)
            self.snapshot[i] = Snapshot()  # the engine forgets every cached prefix: start over
            return False
        log.info("stage %d imported %d checkpoints, %d blocks", i, *snapshot.size())
        return True

    def stats(self) -> list[dict]:
        return self._wait([call(s.stats) for s in self.stages], "stage stats")

    def _close_graph(self) -> None:
        if self.chain is not None:
            self.chain.close()
            self.chain = None

    def shutdown(self) -> None:
        self._close_graph()  # the execution loops end before their actors do
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
