"""Continuous batching: admission by free slots and KV blocks, chunked prefill, micro-batches,
preemption when blocks run out. Pure Python.

The scheduler owns every `Sequence` mutation: admission, what runs next, what a landed micro-batch
advances, forks, finishing, aborts, preemption and replays.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ..config.engine_config import SchedulerConfig
from .kv_cache import KVCache
from .messages import Fork, Segment, SeqInfo, StepMessage
from .sequence import Sequence
from .slots import SlotAllocator


@dataclass(slots=True)
class MicroBatch:
    message: StepMessage
    seqs: list[Sequence]  # one per segment, same order
    token_ids: list[int]
    forked: list[Sequence] = field(default_factory=list)  # whose fork copy rides in this message
    superseded: tuple = ()  # snapshots (prefix.Checkpoint) dropped once this lands
    handle: object = None  # the pipeline's pending result


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, num_slots: int, kv: KVCache, num_micro_batches: int = 1
    ):
        self.config, self.kv = config, kv
        self.num_micro_batches = num_micro_batches
        self.slots = SlotAllocator(num_slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preempted: list[
            Sequence
        ] = []  # since the engine last looked (prompt logprobs restart)
        self.num_preemptions = 0
        self._forks: list[tuple[Fork, list[Sequence]]] = []  # ride in the next message
        self._finished: list[int] = []
        self._step = 0

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
            if self.running and not self.kv.can_resume_all(seq, reserve):
                return
            self.waiting.popleft()
            seq.slot, *fork_slots = self.slots.allocate(1 + len(seq.forks))
            for fork, slot in zip(seq.forks, fork_slots):
                fork.slot, fork.blocks = slot, self.kv.blocks.allocate(1)  # its copied last block
            wants = _wants_prompt_logprobs(seq)  # (those resume only where the logprobs were kept)
            self.kv.resume(seq, seq.params.prompt_logprobs if wants else None)
            self.running.append(seq)

    # ---- what runs next ---------------------------------------------------------------------
    def schedule(self, in_flight: int = 1) -> MicroBatch | None:
        """The next micro-batch from sequences not already in flight, or None."""
        self.admit()
        ready = [s for s in self.running if not s.in_flight and not s.aborted]
        suspect = next((s for s in ready if s.suspect), None)
        if suspect is not None:  # alone, so that a failure again is its own
            chosen = self._chunks([suspect], self.config.max_batched_tokens)
            return self._build(chosen, in_flight) if chosen else None
        chosen = self._decodes(ready)
        chosen += self._chunks(
            [s for s in ready if not _decoding(s)], self.config.max_batched_tokens - len(chosen)
        )
        return self._build(chosen, in_flight) if chosen else None

    def _decodes(self, ready: list[Sequence]) -> list[tuple[Sequence, int]]:
        """A fair share of the decoding sequences (one micro-batch per stage). Each gets its next
        block, by preempting the lowest-ranked running sequences if it must: they are asked in
        rank order, so a sequence never preempts one that outranks it. Returned in slot order:
        consecutive slots let stages update state in place."""
        decoding = sum(_decoding(s) for s in self.running)
        cap = min(math.ceil(decoding / self.num_micro_batches), self.config.max_batched_tokens)
        chosen: list[tuple[Sequence, int]] = []
        for s in sorted((s for s in ready if _decoding(s)), key=_rank):
            keep = {id(q) for q, _ in chosen} | {id(s)}
            if len(chosen) < cap and s.slot is not None and self._room(s, s.num_computed + 1, keep):
                chosen.append((s, 1))
        return sorted(chosen, key=lambda c: c[0].slot)

    def _chunks(self, seqs: list[Sequence], budget: int) -> list[tuple[Sequence, int]]:
        chosen = []
        for s in seqs:
            if budget <= 0 or s.slot is None:
                continue
            end = self.kv.next_stop(s, s.num_computed + min(s.pending(), budget))
            free = self.kv.blocks.num_free + len(s.blocks)
            end = min(end, free * self.kv.block_size)  # a shorter chunk if blocks are short
            if end > s.num_computed and self.kv.grow(s, end):
                chosen.append((s, end - s.num_computed))
                budget -= end - s.num_computed
        return chosen

    def _room(self, seq: Sequence, end: int, keep: set[int]) -> bool:
        """Blocks for `seq` up to `end`, preempting the lowest-ranked sequences not in flight and
        not in `keep` (ids of those already chosen) for them."""
        while not self.kv.grow(seq, end):
            victims = [
                s
                for s in self.running
                if id(s) not in keep and not s.in_flight and s.slot is not None
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
            self._forget(q)
            self.kv.release(q)
            q.slot, q.registered = None, False
        seq.num_computed, seq.restore, seq.suspect, seq.cached_logprobs = 0, None, False, None
        self.running.remove(seq)
        self._enqueue(seq)  # (its arrival rank puts it before later ones of its priority)
        self.preempted.append(seq)
        self.num_preemptions += count

    def _build(self, chosen: list[tuple[Sequence, int]], in_flight: int) -> MicroBatch:
        segments, tokens, admitted = [], [], []
        for s, n in chosen:
            segments.append(self._segment(s, n))
            tokens.extend(s.token(p) for p in range(s.num_computed, s.num_computed + n))
            admitted += [q.info() for q in (s, *s.forks) if not q.registered]
            for q in (s, *s.forks):
                q.registered = True
            s.in_flight = True
        forks, self._forks = self._forks, []
        finished, self._finished = self._finished, []
        ops = self.kv.take_ops()
        self._step += 1
        msg = StepMessage(
            self._step,
            tuple(segments),
            forks=tuple(f for f, _ in forks),
            copies=ops.copies,
            saves=ops.saves,
            export_ckpts=ops.export_ckpts,
            export_blocks=ops.export_blocks,
            admitted=tuple(admitted),
            finished=tuple(finished),
            in_flight=in_flight,
        )
        forked = [q for _, qs in forks for q in qs]
        return MicroBatch(msg, [s for s, _ in chosen], tokens, forked, ops.superseded)

    def _segment(self, seq: Sequence, n: int) -> Segment:
        """Which logit rows a segment needs, who samples from it, and the block-table entries
        and checkpoint the stages need for it: decided here, once."""
        start, end = seq.num_computed, seq.num_computed + n
        blocks, table_start, restore = (
            tuple(seq.blocks[seq.blocks_sent :]),
            seq.blocks_sent,
            seq.restore,
        )
        self.kv.restore_sent(seq)
        seq.blocks_sent, seq.restore = len(seq.blocks), None
        state = dict(blocks=blocks, table_start=table_start, restore=restore)
        if seq.pooling:
            logits = "score" if end >= len(seq.prompt_ids) else "none"
            return Segment(seq.seq_id, seq.slot, start, n, logits, **state)
        # Samples only where the sequence's known tokens end (a replay also re-runs its outputs).
        samples = tuple(q.seq_id for q in (*seq.forks, seq)) if end >= seq.length else ()
        # Prompt logprobs are the request's, collected once: from its first sample.
        wants_prompt = seq.in_prefill and _wants_prompt_logprobs(seq)
        logits = "all" if wants_prompt else "last" if samples else "none"
        return Segment(seq.seq_id, seq.slot, start, n, logits, samples, **state)

    # ---- what a landed micro-batch changes ---------------------------------------------------
    def landed(self, seq: Sequence, seg: Segment) -> None:
        seq.in_flight = False
        seq.num_computed = seg.end
        seq.suspect = seq.suspect and seq.in_prefill  # cleared once its known tokens ran
        if seq.slot is not None:
            self.kv.landed(seq, seg.end)

    def append(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)

    def start_forks(self, seq: Sequence) -> list[Sequence]:
        """After `seq`'s prefill, its forks join the running set, sharing its KV blocks; the state
        copy rides in the next message, before any segment of theirs."""
        forks, seq.forks = seq.forks, []
        if forks:
            self._forks.append((Fork(seq.slot, tuple(f.slot for f in forks)), forks))
        for f in forks:
            self.kv.fork(seq, f)
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
            if s.slot is not None:
                freed.append(s.slot)
                s.slot = None
            self._forget(s)
            self.kv.release(s)
        seq.forks = []
        if seq in self.running:
            self.running.remove(seq)
        self.slots.free(freed)

    def _forget(self, seq: Sequence) -> None:
        """The stages drop its block table and sampling state with the next message."""
        if seq.registered or seq.blocks_sent or seq.num_computed:
            self._finished.append(seq.seq_id)

    def abort(self, request_id: str) -> list[Sequence]:
        """Abort a request: sequences not in flight end now; those in flight when they land."""
        gone = [s for s in self.waiting if s.request_id == request_id]
        for s in gone:
            self.waiting.remove(s)
            for q in (s, *s.forks):
                q.finish_reason = "abort"
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
            self.kv.release(s)
            s.in_flight, s.num_computed, s.registered, s.suspect = False, 0, False, suspect
            s.restore, s.cached_logprobs = None, None
            for f in s.forks:
                f.registered = False

    def rewind(self) -> None:
        """Every running sequence resumes from its latest checkpoint (a stage was replaced from
        the snapshots): like a preemption, without dropping the cache."""
        for s in [s for s in self.running if not s.aborted]:  # (aborted ones just finish)
            s.in_flight = False
            self.preempt(s, count=False)

    def requeue(self, mb: MicroBatch) -> None:
        """A failed message's forgotten ids go out again; its registrations are sent again."""
        self._finished += list(mb.message.finished)
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


def _wants_prompt_logprobs(seq: Sequence) -> bool:
    return seq.index == 0 and getattr(seq.params, "prompt_logprobs", None) is not None


def _decoding(seq: Sequence) -> bool:
    """One token to run (a prefill, or a replay after a stage failure, runs as chunks)."""
    return seq.pending() == 1 and not seq.in_prefill
