"""Continuous batching: admission by free slots, chunked prefill, micro-batches. Pure Python."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .sequence import Segment, Sequence, SequenceStatus, StepMessage
from .slots import SlotAllocator


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int  # state slots per stage
    num_micro_batches: int = 1  # kept in flight; one per stage keeps every stage busy
    max_batched_tokens: int = 512  # tokens per micro-batch; long prompts are chunked to fit

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.num_micro_batches < 1 or self.max_batched_tokens < 1:
            raise ValueError(f"scheduler limits must be positive: {self}")


@dataclass(slots=True)
class MicroBatch:
    message: StepMessage
    seqs: list[Sequence]  # one per segment, same order
    token_ids: list[int]
    ref: object = None  # the pipeline's pending result
    submitted_at: float = 0.0
    meta: dict = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.slots = SlotAllocator(config.max_num_seqs)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._step = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a request's first sample; its other samples ride along in `seq.forks`."""
        if 1 + len(seq.forks) > self.config.max_num_seqs:
            raise ValueError(f"n={1 + len(seq.forks)} exceeds the {self.config.max_num_seqs} state slots")
        self.waiting.append(seq)

    def admit(self) -> None:
        """Move waiting requests to running while their slots (n per request) are free."""
        while self.waiting and self.slots.can_allocate(1 + len(self.waiting[0].forks)):
            seq = self.waiting.popleft()
            seq.slot, *fork_slots = self.slots.allocate(1 + len(seq.forks))
            for fork, slot in zip(seq.forks, fork_slots):
                fork.slot = slot
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def schedule(self, in_flight: int = 1) -> MicroBatch | None:
        """The next micro-batch from sequences not already in flight, or None."""
        self.admit()
        ready = [s for s in self.running if not s.in_flight and not s.aborted]
        decoding = sum(_decoding(s) for s in self.running)
        cap = math.ceil(decoding / self.config.num_micro_batches)
        budget = self.config.max_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        # Decodes in slot order: consecutive slots let stages update state in place, without gathers.
        for s in sorted((s for s in ready if _decoding(s)), key=lambda s: s.slot):
            if cap > 0 and budget > 0:
                chosen.append((s, 1))
                cap, budget = cap - 1, budget - 1
        for s in ready:
            if not _decoding(s) and budget > 0:
                n = min(s.pending(), budget)
                chosen.append((s, n))
                budget -= n
        return self._build(chosen, in_flight) if chosen else None

    def _build(self, chosen: list[tuple[Sequence, int]], in_flight: int) -> MicroBatch:
        segments, tokens = [], []
        for s, n in chosen:
            segments.append(Segment(s.seq_id, s.slot, s.num_computed, n, _logits_mode(s, n)))
            tokens.extend(s.token(p) for p in range(s.num_computed, s.num_computed + n))
            s.in_flight = True
        self._step += 1
        msg = StepMessage(self._step, tuple(segments), in_flight=in_flight)
        return MicroBatch(msg, [s for s, _ in chosen], tokens)

    def replay_all(self) -> list[Sequence]:
        """After a stage was replaced: every running sequence re-runs all its tokens from a fresh
        slot state on every stage (state on the healthy stages must match the new one's)."""
        for s in self.running:
            s.in_flight, s.num_computed = False, 0
        return list(self.running)

    def start_forks(self, seq: Sequence) -> list[Sequence]:
        """After `seq`'s prefill, its forks (state already copied) join the running set."""
        forks, seq.forks = seq.forks, []
        for f in forks:
            f.num_computed, f.status = seq.num_computed, SequenceStatus.RUNNING
            self.running.append(f)
        return forks

    def finish(self, seq: Sequence, reason: str) -> list[int]:
        """End a sequence (and any forks it still carries); returns the slots to release."""
        freed = []
        for s in [seq, *seq.forks]:
            s.status, s.finish_reason = SequenceStatus.FINISHED, s.finish_reason or reason
            if s.slot is not None:
                freed.append(s.slot)
                s.slot = None
        seq.forks = []
        if seq in self.running:
            self.running.remove(seq)
        self.slots.free(freed)
        return freed

    def abort(self, request_id: str) -> tuple[list[Sequence], list[int]]:
        """Abort a request's sequences; those in flight are only marked (freed when they land)."""
        gone = [s for s in self.waiting if s.request_id == request_id]
        for s in gone:
            self.waiting.remove(s)
            s.status, s.finish_reason = SequenceStatus.FINISHED, "abort"
        freed: list[int] = []
        for s in [s for s in self.running if s.request_id == request_id]:
            s.aborted = True
            if not s.in_flight:
                freed += self.finish(s, "abort")
            gone.append(s)
        return gone, freed


def _decoding(seq: Sequence) -> bool:
    """One token to run (a prefill, or a replay after a stage failure, runs as chunks)."""
    return seq.pending() == 1 and not seq.in_prefill


def _logits_mode(seq: Sequence, n: int) -> str:
    if seq.pooling:
        return "score" if seq.num_computed + n >= len(seq.prompt_ids) else "none"
    # Prompt logprobs are the request's, collected once: from its first sample (forks replay without).
    wants_prompt = seq.in_prefill and seq.index == 0 and getattr(seq.params, "prompt_logprobs", None) is not None
    if wants_prompt:
        return "all"
    # Logits only where the sequence's known tokens end (a replay also re-runs its outputs).
    return "last" if seq.num_computed + n >= seq.length else "none"
