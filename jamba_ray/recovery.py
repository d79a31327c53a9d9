"""Stage failures and leaked state: replace dead stages, replay sequences, reap orphaned slots."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import StageFailedError
from .pipeline import call

if TYPE_CHECKING:
    from .engine import EngineCore

log = logging.getLogger(__name__)


def recover(core: EngineCore) -> list[int]:
    """A micro-batch failed: replace dead stages, then replay every running sequence."""
    dead = replace_dead_stages(core)
    replay(core)
    return dead


def replace_dead_stages(core: EngineCore) -> list[int]:
    """Blocking (actor start-up). Raises StageFailedError when no stage is dead (a compute
    error, not a crash) or replacements keep failing; the caller then fails the requests."""
    core.in_flight.clear()
    unconfirmed: set[int] = set()  # replacements started whose start-up timed out or failed
    for attempt in range(core.config.max_stage_restarts):
        dead = core.pipeline.dead_stages()
        if not dead and not unconfirmed:
            _reconnect(core)
            raise StageFailedError("a pipeline stage failed to compute")
        if not dead:  # a replacement that missed its start-up deadline answers after all
            core.pipeline.reconnect()
            core.counters["stage_restarts"] += len(unconfirmed)
            return sorted(unconfirmed)
        log.warning("stages %s died; starting replacements (attempt %d)", dead, attempt + 1)
        try:
            core.pipeline.replace(dead)
        except StageFailedError as e:
            log.error("replacement failed: %s", e)
            unconfirmed |= set(dead)
            continue
        core.counters["stage_restarts"] += len(unconfirmed | set(dead))
        return dead
    raise StageFailedError("pipeline stages died and could not be replaced")


def _reconnect(core: EngineCore) -> None:
    """No stage died but a step failed: if the failure was the p2p link (a lost message, a
    transport error), only a new group puts it back in step for the requests that come next."""
    try:
        core.pipeline.reconnect()
    except StageFailedError as e:
        log.error("could not re-form the stages' p2p group: %s", e)


def replay(core: EngineCore) -> None:
    """Every running sequence re-runs its tokens on fresh slot state; streams just continue."""
    core.in_flight.clear()
    replayed = core.scheduler.replay_all()
    for seq in replayed:
        state = core.requests.get(seq.request_id)
        if state is not None and state.prompt_logprobs is not None:
            state.prompt_logprobs = [None]  # recomputed by the replay
    log.warning("replaying %d sequences", len(replayed))


def reap(core: EngineCore, stage_stats: list[dict]) -> int:
    """Free slots a stage holds that no live sequence owns (and allocations nobody holds)."""
    owned = {s.slot for seq in core.scheduler.running for s in (seq, *seq.forks) if s.slot is not None}
    owned |= {s.slot for mb in core.in_flight for s in mb.seqs if s.slot is not None}
    orphans = 0
    for st, stage in zip(stage_stats, core.pipeline.stages):
        extra = sorted(set(st["slots"]) - owned)
        if extra:
            log.warning("reaper: stage %d held orphaned slots %s; releasing", st["stage"], extra)
            call(stage.release, extra)
            orphans += len(extra)
    leaked = core.scheduler.slots.allocated() - owned
    if leaked:
        log.warning("reaper: slots %s allocated to no sequence; freeing", sorted(leaked))
        core.scheduler.slots.free(sorted(leaked))
        core.pipeline.release(sorted(leaked))
        orphans += len(leaked)
    core.counters["reaped_slots"] += orphans
    return orphans


def fail_all(core: EngineCore, error: Exception) -> None:
    """Give up: every request ends (its sink gets `error`), every slot is released."""
    core.in_flight.clear()
    for seq in core.scheduler.running:
        seq.in_flight = False
    for rid, state in list(core.requests.items()):
        state.sink(error)
        core.abort(rid)
