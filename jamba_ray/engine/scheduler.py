"""Continuous batching: admission by free slots, chunked prefill, micro-batches. Pure Python.

The scheduler owns every `Sequence` mutation: admission, what runs next, what a landed micro-batch
advances, forks, finishing, aborts and replays.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ..config.engine_config import SchedulerConfig
from .messages import Fork, Segment, SeqInfo, StepMessage
from .sequence import Sequence
from .slots import SlotAllocator


@dataclass(slots=True)
class MicroBatch:
    message: StepMessage
    seqs: list[Sequence]  # one per segment, same order
    token_ids: list[int]
    forked: list[Sequence] = field(default_factory=list)  # whose fork copy rides in this message
    handle: object = None  # the pipeline's pending result


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_slots: int, num_micro_batches: int = 1):
        self.config = config
        self.num_micro_batches = num_micro_batches
        self.slots = SlotAllocator(num_slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._forks: list[tuple[Fork, list[Sequence]]] = []  # ride in the next message
        self._finished: list[int] = []
        self._step = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a request's first sample; its other samples ride along in `seq.forks`."""
        if 1 + len(seq.forks) > self.slots.num_slots:
            raise ValueError(
                f"n={1 + len(seq.forks)} exceeds the {self.slots.num_slots} state slots"
            )
        self.waiting.append(seq)

    def admit(self) -> None:
        """Move waiting requests to running while their slots (n per request) are free."""
        while self.waiting and self.slots.can_allocate(1 + len(self.waiting[0].forks)):
            seq = self.waiting.popleft()
            seq.slot, *fork_slots = self.slots.allocate(1 + len(seq.forks))
            for fork, slot in zip(seq.forks, fork_slots):
                fork.slot = slot
            self.running.append(seq)

    # ---- what runs next ---------------------------------------------------------------------
    def schedule(self, in_flight: int = 1) -> MicroBatch | None:
        """The next micro-batch from sequences not already in flight, or None."""
        self.admit()
        ready = [s for s in self.running if not s.in_flight and not s.aborted]
        suspect = next((s for s in ready if s.suspect), None)
        if suspect is not None:  # alone, so that a failure again is its own
            return self._build(
                [(suspect, min(suspect.pending(), self.config.max_batched_tokens))], in_flight
            )
        chosen = self._decodes(ready)
        budget = self.config.max_batched_tokens - len(chosen)
        for s in ready:
            if not _decoding(s) and budget > 0:
                n = min(s.pending(), budget)
                chosen.append((s, n))
                budget -= n
        return self._build(chosen, in_flight) if chosen else None

    def _decodes(self, ready: list[Sequence]) -> list[tuple[Sequence, int]]:
        """A fair share of the decoding sequences (one micro-batch per stage), in slot order:
        consecutive slots let stages update state in place."""
        decoding = sum(_decoding(s) for s in self.running)
        cap = min(math.ceil(decoding / self.num_micro_batches), self.config.max_batched_tokens)
        return [(s, 1) for s in sorted((s for s in ready if _decoding(s)), key=lambda s: s.slot)][
            :cap
        ]

    def _build(self, chosen: list[tuple[Sequence, int]], in_flight: int) -> MicroBatch:
        segments, tokens, admitted = [], [], []
        for s, n in chosen:
            segments.append(_segment(s, n))
            tokens.extend(s.token(p) for p in range(s.num_computed, s.num_computed + n))
            admitted += [q.info() for q in (s, *s.forks) if not q.registered]
            for q in (s, *s.forks):
                q.registered = True
            s.in_flight = True
        forks, self._forks = self._forks, []
        finished, self._finished = self._finished, []
        self._step += 1
        msg = StepMessage(
            self._step,
            tuple(segments),
            tuple(f for f, _ in forks),
            tuple(admitted),
            tuple(finished),
            in_flight,
        )
        return MicroBatch(msg, [s for s, _ in chosen], tokens, [q for _, qs in forks for q in qs])

    # ---- what a landed micro-batch changes ---------------------------------------------------
    def landed(self, seq: Sequence, seg: Segment) -> None:
        seq.in_flight = False
        seq.num_computed = seg.end
        seq.suspect = seq.suspect and seq.in_prefill  # cleared once its known tokens ran

    def append(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)

    def start_forks(self, seq: Sequence) -> list[Sequence]:
        """After `seq`'s prefill, its forks join the running set; the state copy rides in the
        next message, before any segment of theirs."""
        forks, seq.forks = seq.forks, []
        if forks:
            self._forks.append(
                (Fork(seq.slot, tuple(f.slot for f in forks), seq.num_computed), forks)
            )
        for f in forks:
            f.num_computed = seq.num_computed
            self.running.append(f)
        return forks

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (and any forks it still carries) and free its slots."""
        freed = []
        for s in [seq, *seq.forks]:
            s.finish_reason = s.finish_reason or reason
            if s.slot is not None:
                freed.append(s.slot)
                s.slot = None
            if s.registered:
                self._finished.append(s.seq_id)
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
        for s in [s for s in self.running if s.request_id == request_id]:
            s.aborted = True
            if not s.in_flight:
                self.finish(s, "abort")
            gone.append(s)
        return gone

    # ---- failures ----------------------------------------------------------------------------
    def replay(self, seqs: list[Sequence], suspect: bool = False) -> None:
        """These sequences re-run every known token from a fresh state (and are registered with
        the last stage again); `suspect` ones run alone until they catch up."""
        for s in seqs:
            s.in_flight, s.num_computed, s.registered, s.suspect = False, 0, False, suspect
            for f in s.forks:
                f.registered = False

    def requeue(self, mb: MicroBatch) -> None:
        """A failed message's finished ids go out again; its registrations are sent again."""
        self._finished += list(mb.message.finished)
        for info in mb.message.admitted:
            self._unregister(info)

    def _unregister(self, info: SeqInfo) -> None:
        for s in self.running:
            for q in (s, *s.forks):
                if q.seq_id == info.seq_id:
                    q.registered = False


def _decoding(seq: Sequence) -> bool:
    """One token to run (a prefill, or a replay after a stage failure, runs as chunks)."""
    return seq.pending() == 1 and not seq.in_prefill


def _segment(seq: Sequence, n: int) -> Segment:
    """Which logit rows a segment needs and who samples from it: decided here, once."""
    start, end = seq.num_computed, seq.num_computed + n
    if seq.pooling:
        return Segment(
            seq.seq_id, seq.slot, start, n, "score" if end >= len(seq.prompt_ids) else "none"
        )
    # Samples only where the sequence's known tokens end (a replay also re-runs its outputs).
    samples = tuple(q.seq_id for q in (*seq.forks, seq)) if end >= seq.length else ()
    # Prompt logprobs are the request's, collected once: from its first sample.
    wants_prompt = (
        seq.in_prefill
        and seq.index == 0
        and getattr(seq.params, "prompt_logprobs", None) is not None
    )
    logits = "all" if wants_prompt else "last" if samples else "none"
    return Segment(seq.seq_id, seq.slot, start, n, logits, samples)
