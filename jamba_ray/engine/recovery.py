"""Failed micro-batches: replace dead stages and replay, or fail only the request at fault.

A micro-batch that does not come back is held until every other one in flight has landed; then
`replace_dead()` (blocking, pipeline only) finds out why and `resume()` repairs the bookkeeping:
- a stage died: it is replaced, and the running sequences re-run their tokens, so streams just
  continue. With recovery snapshots the replacement imports every checkpoint and full KV block
  its predecessor exported, healthy stages keep theirs, and each sequence resumes from its latest
  checkpoint (at most `checkpoint_every` tokens back, whatever its length); without them (or when
  the import fails) every sequence re-runs all its tokens on fresh state;
- every stage is alive (a compute error): the requests of the failed micro-batch are at fault. One
  request alone fails with a clear error; several re-run alone ("suspect"), so that a second
  failure is pinned on its own request and the others go on;
- stages died and could not be replaced: every request fails (503 / UNAVAILABLE).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import StageFailedError
from .messages import StepFailure
from .scheduler import MicroBatch
from .sequence import Sequence

if TYPE_CHECKING:
    from .core import EngineCore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Replaced:
    stages: list[int]  # the stages replaced (none: a compute error)
    restored: bool  # every replacement imported its predecessor's snapshots


class Recovery:
    def __init__(self, core: EngineCore, max_restarts: int):
        self.core, self.max_restarts = core, max_restarts
        self.failures: list[tuple[MicroBatch, StepFailure]] = []

    @property
    def pending(self) -> bool:
        return bool(self.failures)

    def failed(self, mb: MicroBatch, failure: StepFailure) -> None:
        log.warning("step %d failed: %s", mb.message.step_id, failure.error)
        for seq in mb.seqs:
            seq.in_flight = False
        self.core.scheduler.requeue(mb)
        self.failures.append((mb, failure))

    def replace_dead(self) -> Replaced | StageFailedError:
        """Blocking: the stages replaced, or why they could not be. Dead stages are looked for
        again after each replacement: a second stage dying meanwhile, a replacement dying, or one
        that missed its start-up deadline but came up after all."""
        pipeline = self.core.pipeline
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
                ok = pipeline.replace(dead, self._trusted())
            except StageFailedError as e:
                ok = False  # (one that comes up after all holds no snapshot: not trusted)
                log.error("replacement failed: %s", e)
            imported.update(dict.fromkeys(dead, ok))
        return StageFailedError("pipeline stages died and could not be replaced")

    def _trusted(self) -> tuple[set[int], set[int]] | None:
        """What a replacement must import (None: there are no snapshots)."""
        kv = self.core.kv
        return kv.trusted(_messages(self.failures)) if kv.snapshots else None

    def stage_died(self) -> None:
        """A probe found a dead stage with nothing in flight: recover in the next step."""
        if not self.failures:
            self.failures.append((None, StepFailure("a stage stopped answering")))

    def resume(self, outcome: Replaced | StageFailedError) -> None:
        """Repair the bookkeeping once nothing is in flight (see the module docstring)."""
        failures, self.failures = self.failures, []
        core = self.core
        if isinstance(outcome, StageFailedError):
            log.error("failing all requests: %s", outcome)
            for rid in list(core.outputs.requests):
                core.fail_request(rid, outcome)
        elif outcome.stages:
            core.counters["stage_restarts"] += len(outcome.stages)
            if outcome.restored:  # (only with snapshots)
                self._rewind(failures)
            else:
                self._replay(list(core.scheduler.running), suspect=False)
        else:
            for mb, failure in failures:
                if mb is not None:
                    self._isolate(mb, failure)
            self._untrust(_messages(failures))
        for seq in list(core.scheduler.running):  # aborted while its micro-batch was failing
            if seq.aborted:
                core.finish_seq(seq)

    def _rewind(self, failures: list[tuple[MicroBatch | None, StepFailure]]) -> None:
        """The replacement holds what its predecessor exported; what failed messages made did
        not reach it and is forgotten. Every sequence resumes from its latest checkpoint."""
        self.core.kv.forget_unexported(_messages(failures))
        log.warning("resuming %d sequences from their snapshots", len(self.core.scheduler.running))
        self.core.scheduler.rewind()

    def _untrust(self, msgs: list) -> None:
        """A compute error stopped these messages part-way down the pipeline: their state
        operations ran on the stages before it only. Copies and checkpoint saves are then not
        everywhere: every running sequence re-runs on fresh state and the cache is forgotten.
        Their exports did not land: blocks still cached go out again."""
        core = self.core
        if any(m.copies or m.saves for m in msgs):
            core.kv.clear()  # (even with no sequence left to replay)
            running = core.scheduler.running  # (suspects, replayed alone already, stay so)
            self._replay([s for s in running if not s.aborted and not s.suspect], suspect=False)
        elif core.kv.snapshots:
            core.kv.reexport([b for m in msgs for b in m.export_blocks])

    def _isolate(self, mb: MicroBatch, failure: StepFailure) -> None:
        core = self.core
        core.counters["isolated_failures"] += 1
        requests = list(dict.fromkeys(s.request_id for s in mb.seqs))
        if len(requests) == 1:
            core.fail_request(
                requests[0],
                StageFailedError(
                    f"a pipeline stage failed to compute this request: {failure.error}"
                ),
            )
        else:
            self._replay([s for s in mb.seqs if not s.aborted], suspect=True)
        # forks whose state copy rode in the failed message start over from their own tokens
        self._replay([s for s in mb.forked if not s.finished], suspect=False)

    def _replay(self, seqs: list[Sequence], suspect: bool) -> None:
        if not seqs:
            return
        log.warning("replaying %d sequences%s", len(seqs), " one at a time" if suspect else "")
        self.core.scheduler.replay(seqs, suspect)
        for s in seqs:  # prompt logprobs come from the first sample's prefill: it runs again
            if s.index == 0:
                self.core.outputs.restart_prompt_logprobs(s.request_id)


def _messages(failures: list[tuple[MicroBatch | None, StepFailure]]) -> list:
    """The step messages of the failed micro-batches (a probe's failure has none)."""
    return [mb.message for mb, _ in failures if mb is not None]


def _reconnect(pipeline) -> None:
    """A failed step may have left the p2p link out of step: a new group puts it back."""
    try:
        pipeline.reconnect()
    except StageFailedError as e:
        log.error("could not re-form the stages' p2p group: %s", e)
