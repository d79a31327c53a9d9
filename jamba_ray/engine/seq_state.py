"""What the KV cache keeps for each live sequence, and what it hands the scheduler. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass, field

from .blocks import Key
from .sequence import Sequence


@dataclass(slots=True)
class SeqState:
    """What the KV cache keeps for one live sequence."""

    root: Key  # its cache_salt's chain root
    blocks: list[int] = field(default_factory=list)  # KV block table
    keys: list[Key] = field(default_factory=list)  # chained keys of its committed full blocks
    sent: int = 0  # table entries the stages already hold
    restore: int | None = None  # checkpoint to restore into the slot before its next segment
    junction: int = 0  # where the cached full blocks of its prompt ended when it was admitted


@dataclass(frozen=True, slots=True)
class Resumed:
    length: int  # tokens the checkpoint covers
    logprobs: list | None  # prompt-logprob entries of positions 0..length, when asked for


@dataclass(frozen=True, slots=True)
class SegmentState:
    blocks: tuple[int, ...]  # table entries from `table_start` on
    table_start: int
    restore: int | None
    emits: tuple[tuple[int, int], ...] = ()  # (position, reserved checkpoint)


def tokens_of(seq: Sequence, start: int, n: int) -> list[int]:
    """seq's tokens [start, start + n) without joining its prompt and output."""
    p = len(seq.prompt_ids)
    if start + n <= p:
        return seq.prompt_ids[start : start + n]
    if start >= p:
        return seq.output_ids[start - p : start - p + n]
    return seq.prompt_ids[start:] + seq.output_ids[: start + n - p]
