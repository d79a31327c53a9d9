"""Failed micro-batches: what to do about them, decided as a plan the engine core applies.

A micro-batch that does not come back is held until every other one in flight has landed; then
`replace_dead()` (blocking, pipeline only) finds out why and `plan()` decides:
- a stage died: it is replaced, and the running sequences re-run their tokens, so streams just
  continue. With recovery snapshots the replacement imports every checkpoint and full KV block
  its predecessor exported, healthy stages keep theirs, and each sequence resumes from its latest
  checkpoint (at most `checkpoint_every` tokens back, whatever its length); without them (or when
  the import fails) every sequence re-runs all its tokens on fresh state;
- every stage is alive (a compute error): the requests of the failed micro-batch are at fault. One
  request alone fails with a clear error; several re-run alone ("suspect"), so that a second
  failure is pinned on its own request and the others go on;
- stages died and could not be replaced: every request fails (503 / UNAVAILABLE).
This module reads the scheduler and the pipeline; it changes neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import StageFailedError
from .messages import StepFailure, StepMessage
from .micro_batch import MicroBatch
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Replaced:
    stages: list[int]  # the stages replaced (none: a compute error)
    restored: bool  # every replacement imported its predecessor's snapshots


@dataclass(slots=True)
class RecoveryPlan:
    """What the core does, in this order."""

    fail_all: StageFailedError | None = None  # every request fails with this
    fail: list[tuple[str, StageFailedError]] = field(default_factory=list)  # (request, error)
    forget_unexported: list[StepMessage] | None = None  # a replacement lacks what these made
    rewind: bool = False  # every running sequence resumes from its latest checkpoint
    clear_cache: bool = False  # no cached prefix is trusted (even with nothing to replay)
    replay: list[Sequence] = field(default_factory=list)  # re-run every token, fresh state
    suspect: list[Sequence] = field(default_factory=list)  # the same, one at a time
    reexport: list[int] = field(default_factory=list)  # blocks whose export did not land
    stage_restarts: int = 0
    isolated_failures: int = 0


class Recovery:
    def __init__(self, max_restarts: int):
        self.max_restarts = max_restarts
        self.failures: list[tuple[MicroBatch | None, StepFailure]] = []

    @property
    def pending(self) -> bool:
        return bool(self.failures)

    def failed(self, mb: MicroBatch, failure: StepFailure) -> None:
        log.warning("step %d failed: %s", mb.message.step_id, failure.error)
        self.failures.append((mb, failure))

    def stage_died(self) -> None:
        """A probe found a dead stage with nothing in flight: recover in the next step."""
        if not self.failures:
            self.failures.append((None, StepFailure("a stage stopped answering")))

    def messages(self) -> list[StepMessage]:
        """The step messages of the failed micro-batches (a probe's failure has none)."""
        return [mb.message for mb, _ in self.failures if mb is not None]

    def replace_dead(self, pipeline, trusted) -> Replaced | StageFailedError:
        """Blocking: the stages replaced, or why they could not be. Dead stages are looked for
        again after each replacement: a second stage dying meanwhile, a replacement dying, or one
        that missed its start-up deadline but came up after all. `trusted`: what a replacement
        must import (None: there are no snapshots)."""
        imported: dict[int, bool] = {}  # stage -> its latest replacement imported the snapshots
        for attempt in range(self.max_restarts + 1):
            dead = pipeline.dead_stages()
            if not dead:
                if not imported:  # a compute error may have left the p2p link out of step
                    _reconnect(pipeline)
                return Replaced(sorted(imported), all(imported.values()))
            if attempt == self.max_restarts:
                break
            log.warning("stages %s died; starting replacements (attempt %d)", dead, attempt + 1)
            try:
                ok = pipeline.replace(dead, trusted)
            except StageFailedError as e:
                ok = False  # (one that comes up after all holds no snapshot: not trusted)
                log.error("replacement failed: %s", e)
            imported.update(dict.fromkeys(dead, ok))
        return StageFailedError("pipeline stages died and could not be replaced")

    def plan(self, outcome: Replaced | StageFailedError, running: list[Sequence]) -> RecoveryPlan:
        """Decide once nothing is in flight (see the module docstring); the failures are taken."""
        msgs = self.messages()
        failures, self.failures = self.failures, []
        if isinstance(outcome, StageFailedError):
            log.error("failing all requests: %s", outcome)
            return RecoveryPlan(fail_all=outcome)
        live = [s for s in running if not s.aborted]
        if outcome.stages:
            if outcome.restored:  # (only with snapshots)
                log.warning("resuming %d sequences from their snapshots", len(live))
                return RecoveryPlan(
                    forget_unexported=msgs, rewind=True, stage_restarts=len(outcome.stages)
                )
            # (the replacement holds no checkpoint: the cache goes even with nothing to replay)
            return RecoveryPlan(replay=live, clear_cache=True, stage_restarts=len(outcome.stages))
        plan = RecoveryPlan()
        for mb, failure in failures:
            if mb is not None:
                _isolate(plan, mb, failure)
        _untrust(plan, msgs, live)
        return plan


def _isolate(plan: RecoveryPlan, mb: MicroBatch, failure: StepFailure) -> None:
    plan.isolated_failures += 1
    requests = list(dict.fromkeys(s.request_id for s in mb.seqs))
    if len(requests) == 1:
        error = f"a pipeline stage failed to compute this request: {failure.error}"
        plan.fail.append((requests[0], StageFailedError(error)))
    else:
        plan.suspect += [s for s in mb.seqs if not s.aborted]
    # forks whose state copy rode in the failed message start over from their own tokens
    plan.replay += [s for s in mb.forked if not s.finished]


def _untrust(plan: RecoveryPlan, msgs: list[StepMessage], live: list[Sequence]) -> None:
    """A compute error stopped these messages part-way down the pipeline: their state operations
    ran on the stages before it only. Copies and checkpoint saves are then not everywhere: every
    running sequence re-runs on fresh state and the cache is forgotten. Their exports did not
    land: blocks still cached go out again."""
    if any(m.copies or m.saves for m in msgs):
        plan.clear_cache = True
        taken = {id(s) for s in plan.suspect}  # (suspects, replayed alone already, stay so)
        plan.replay += [s for s in live if not s.suspect and id(s) not in taken]
    else:
        plan.reexport = [b for m in msgs for b in m.export_blocks]


def trusted(kv, failed: list[StepMessage]) -> tuple[set[int], set[int]]:
    """What a replacement must import: the checkpoints and KV blocks the engine may still read
    from (committed blocks, and the tail blocks checkpoints hold), less what never reached the
    driver (`KVCache.unexported`)."""
    if kv.prefix is None:
        return set(), set()
    ckpts, tails = kv.prefix.held()
    lost_ckpts, lost_blocks = kv.unexported(failed)
    return ckpts - lost_ckpts, (tails | kv.blocks.committed_blocks()) - lost_blocks


def _reconnect(pipeline) -> None:
    """A failed step may have left the p2p link out of step: a new group puts it back."""
    try:
        pipeline.reconnect()
    except StageFailedError as e:
        log.error("could not re-form the stages' p2p group: %s", e)
