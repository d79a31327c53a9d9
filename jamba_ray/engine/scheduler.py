"""Continuous batching: admission by free slots and KV blocks, chunked prefill, micro-batches,
preemption when blocks run out. Pure Python.

The scheduler owns every `Sequence` mutation: admission, what runs next, what a landed micro-batch
advances, forks, finishing, aborts, preemption and replays.
"""

from __future__ import annotations

import math
from collections import deque

from ..config.engine_config import SchedulerConfig
from .kv_cache import KVCache
from .messages import Segment, SeqInfo, StepMessage
from .micro_batch import MicroBatch, segment, wants_prompt_logprobs
from .sequence import Sequence
from .slots import SlotAllocator


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, num_slots: int, kv: KVCache, num_micro_batches: int = 1
    ):
        self.config, self.kv = config, kv
        self.num_micro_batches = num_micro_batches
        self.slots = SlotAllocator(num_slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preempted: list[Sequence] = []  # since the engine looked (prompt logprobs restart)
        self.num_preemptions = 0
        self._step = 0
        self.tier = None  # a prefix tier's link (`tier_link.TierLink`): imports at admission

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a request's first sample (its other samples ride along in `seq.forks`), in
        priority order: lower `priority` first, then arrival."""
        if 1 + len(seq.forks) > self.slots.num_slots:
            raise ValueError(
                f"n={1 + len(seq.forks)} exceeds the {self.slots.num_slots} state slots"
            )
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        at = next(
            (i for i, w in enumerate(self.waiting) if _rank(w) > _rank(seq)), len(self.waiting)
        )
        self.waiting.insert(at, seq)

    def admit(self) -> None:
        """Move waiting requests to running while their slots (n per request) and the blocks of
        their known tokens are free (beyond one block for each decoding sequence)."""
        while self.waiting:
            seq = self.waiting[0]
            reserve = sum(1 for s in self.running if not s.in_prefill)
            if not self.slots.can_allocate(1 + len(seq.forks)):
                return
            if self.running and not self.kv.can_admit(seq, len(seq.forks), reserve):
                return
            self.waiting.popleft()
            seq.slot, *fork_slots = self.slots.allocate(1 + len(seq.forks))
            for fork, slot in zip(seq.forks, fork_slots):
                fork.slot = slot
            if self.tier is not None:
                self.tier.import_prefix(seq)
            wants = wants_prompt_logprobs(seq)  # (those resume only where the logprobs were kept)
            hit = self.kv.admit(seq, seq.forks, seq.params.prompt_logprobs if wants else None)
            if hit is not None:
                seq.num_computed = seq.num_cached = hit.length
                seq.cached_logprobs = hit.logprobs
            self.running.append(seq)

    # ---- what runs next ---------------------------------------------------------------------
    def schedule(self, in_flight: int = 1) -> MicroBatch | None:
        """The next micro-batch from sequences not already in flight, or None."""
        self.admit()
        ready = [s for s in self.running if not s.in_flight and not s.aborted]
        for suspect in [s for s in ready if s.suspect]:  # alone: a failure again is its own
            if chosen := self._chunks([suspect], self.config.max_batched_tokens):
                return self._build(chosen, in_flight)
        ready = [s for s in ready if not s.suspect]  # (one short of blocks waits; others go on)
        chosen = self._decodes(ready)
        chosen += self._chunks(
            [s for s in ready if not _decoding(s)],
            self.config.max_batched_tokens - len(chosen),
            {id(q) for q, _ in chosen},
        )
        return self._build(chosen, in_flight) if chosen else None

    def _decodes(self, ready: list[Sequence]) -> list[tuple[Sequence, int]]:
        """A fair share of the decoding sequences (one micro-batch per stage), asked in rank
        order: each gets its next block, by preempting lower-ranked sequences if it must.
        Returned in slot order: consecutive slots let stages update state in place."""
        decoding = sum(_decoding(s) for s in self.running)
        cap = min(math.ceil(decoding / self.num_micro_batches), self.config.max_batched_tokens)
        chosen: list[tuple[Sequence, int]] = []
        for s in sorted((s for s in ready if _decoding(s)), key=_rank):
            keep = {id(q) for q, _ in chosen}
            if len(chosen) < cap and s.slot is not None and self._room(s, s.num_computed + 1, keep):
                chosen.append((s, 1))
        return sorted(chosen, key=lambda c: c[0].slot)

    def _chunks(self, seqs: list[Sequence], budget: int, keep: set[int] = frozenset()):
        """Prefill chunks up to the token budget, shortened to the blocks there are; one that
        gets none takes a block from lower-ranked sequences (two prefills never wait on each
        other's blocks: the higher-ranked one goes on)."""
        chosen, keep = [], set(keep)
        for s in sorted(seqs, key=_rank):
            if budget <= 0 or s.slot is None:
                continue
            end = self.kv.next_stop(s, s.num_computed + min(s.pending(), budget))
            have = len(self.kv.table(s.seq_id))
            end = min(end, (self.kv.available() + have) * self.kv.block_size)
            if end <= s.num_computed:  # no block to be had: one from a lower-ranked sequence
                end = min(s.num_computed + budget, s.length, (have + 1) * self.kv.block_size)
                if not self._room(s, end, keep):
                    continue
            elif not self.kv.grow(s, end):
                continue
            chosen.append((s, end - s.num_computed))
            keep.add(id(s))
            budget -= end - s.num_computed
        return chosen

    def _room(self, seq: Sequence, end: int, keep: set[int]) -> bool:
        """Blocks for `seq` up to `end`, preempting the lowest-ranked sequences that rank below
        it and are neither in flight nor in `keep` (ids of those already chosen)."""
        while not self.kv.grow(seq, end):
            victims = [
                s
                for s in self.running
                if id(s) not in keep
                and not s.in_flight
                and s.slot is not None
                and _rank(s) > _rank(seq)
            ]
            victim = max(victims, key=_rank, default=None)  # the lowest priority, youngest
            if victim is None:
                return False
            self.preempt(victim)
        return True

    def preempt(self, seq: Sequence, count: bool = True) -> None:
        """Drop its state and queue it first: it re-runs its tokens later (or resumes from the
        prefix cache). Nothing of its output changes."""
        self.slots.free([q.slot for q in (seq, *seq.forks)])
        for q in (seq, *seq.forks):
            self.kv.release(q, forget=q.registered or q.num_computed > 0)
            q.slot, q.registered = None, False
        seq.num_computed, seq.suspect, seq.cached_logprobs = 0, False, None
        self.running.remove(seq)
        self._enqueue(seq)  # (its arrival rank puts it before later ones of its priority)
        self.preempted.append(seq)
        self.num_preemptions += count

    def _build(self, chosen: list[tuple[Sequence, int]], in_flight: int) -> MicroBatch:
        segments, tokens, admitted = [], [], []
        for s, n in chosen:
            segments.append(segment(s, n, self.kv.segment(s)))
            tokens.extend(s.token(p) for p in range(s.num_computed, s.num_computed + n))
            admitted += [q.info() for q in (s, *s.forks) if not q.registered]
            for q in (s, *s.forks):
                q.registered = True
            s.in_flight = True
        ops = self.kv.seal()
        self._step += 1
        msg = StepMessage(
            self._step,
            tuple(segments),
            admitted=tuple(admitted),
            in_flight=in_flight,
            **ops.message_fields(),
        )
        dsts = {d for f in ops.forks for d in f.dsts}
        forked = [q for q in self.running if q.slot in dsts]
        return MicroBatch(msg, [s for s, _ in chosen], tokens, forked, ops)

    # ---- what a landed micro-batch changes ---------------------------------------------------
    def landed(self, seq: Sequence, seg: Segment) -> None:
        seq.in_flight = False
        seq.num_computed = seg.end
        seq.suspect = seq.suspect and seq.in_prefill  # cleared once its known tokens ran
        if seq.slot is not None:
            self.kv.land(seq, seg.end)

    def append(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)

    def start_forks(self, seq: Sequence) -> list[Sequence]:
        """After `seq`'s prefill, its forks join the running set, sharing its KV blocks; the state
        copy rides in the next message, before any segment of theirs."""
        forks, seq.forks = seq.forks, []
        self.kv.fork(seq, forks)
        for f in forks:
            f.num_computed = seq.num_computed
            self.running.append(f)
        return forks

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (and any forks it still carries) and free its slots and blocks; the
        state after its last computed token stays as a checkpoint (a chat's next turn)."""
        if reason != "abort" and seq.slot is not None:
            self.kv.save(seq, seq.num_computed)
        freed = []
        for s in [seq, *seq.forks]:
            s.finish_reason = s.finish_reason or reason
            self.kv.release(s, forget=s.registered or s.num_computed > 0, ended=True)
            if s.slot is not None:
                freed.append(s.slot)
                s.slot = None
        seq.forks = []
        if seq in self.running:
            self.running.remove(seq)
        self.slots.free(freed)

    def abort(self, request_id: str) -> list[Sequence]:
        """Abort a request: sequences not in flight end now; those in flight when they land."""
        gone = [s for s in self.waiting if s.request_id == request_id]
        for s in gone:
            self.waiting.remove(s)
            for q in (s, *s.forks):
                q.finish_reason = "abort"
                self.kv.release(q, forget=False, ended=True)  # (a preempted one's snapshot)
        for s in [s for s in self.running if s.request_id == request_id]:
            s.aborted = True
            if not s.in_flight:
                self.finish(s, "abort")
            gone.append(s)
        return gone

    # ---- failures ----------------------------------------------------------------------------
    def replay(self, seqs: list[Sequence], suspect: bool = False) -> None:
        """These sequences re-run every known token from a fresh state into fresh blocks of their
        own (and are registered with the last stage again); `suspect` ones run alone until they
        catch up. No cached prefix is trusted after a failure."""
        self.kv.clear()
        for s in seqs:
            self.kv.restart(s)
            s.in_flight, s.num_computed, s.registered, s.suspect = False, 0, False, suspect
            s.cached_logprobs = None
            for f in s.forks:
                f.registered = False

    def recover(self, plan) -> list[Sequence]:
        """Apply a recovery plan's state changes (to sequences still running); returns those that
        re-run from their first token."""
        if plan.forget_unexported is not None:
            self.kv.forget_unexported(plan.forget_unexported)
        if plan.rewind:
            self.rewind()
        if plan.clear_cache:
            self.kv.clear()
        running = {id(s) for s in self.running if not s.aborted}
        suspect = [s for s in dict.fromkeys(plan.suspect) if id(s) in running]
        taken = running - {id(s) for s in suspect}
        replay = [s for s in dict.fromkeys(plan.replay) if id(s) in taken]
        for seqs, alone in ((suspect, True), (replay, False)):
            if seqs:
                self.replay(seqs, alone)
        self.kv.reexport(plan.reexport)
        return suspect + replay

    def rewind(self) -> None:
        """Every running sequence resumes from its latest checkpoint (a stage was replaced from
        the snapshots): like a preemption, without dropping the cache."""
        for s in [s for s in self.running if not s.aborted]:  # (aborted ones just finish)
            s.in_flight = False
            self.preempt(s, count=False)

    def requeue(self, mb: MicroBatch) -> None:
        """A failed message's forgotten ids go out again; its registrations are sent again."""
        self.kv.forget_again(mb.message.finished)
        for info in mb.message.admitted:
            self._unregister(info)

    def _unregister(self, info: SeqInfo) -> None:
        for s in self.running:
            for q in (s, *s.forks):
                if q.seq_id == info.seq_id:
                    q.registered = False


def _rank(seq: Sequence) -> tuple[int, int]:
    """Lower runs first: the request's priority (vLLM's), then arrival."""
    return (getattr(seq.params, "priority", 0) or 0, seq.seq_id)


def _decoding(seq: Sequence) -> bool:
    """One token to run (a prefill, or a replay after a stage failure, runs as chunks)."""
    return seq.pending() == 1 and not seq.in_prefill
