"""The small typed message that crosses stage boundaries beside the hidden states. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LogitsMode = Literal["none", "last", "all"]


@dataclass(frozen=True, slots=True)
class Segment:
    """`length` consecutive tokens of one sequence, at positions [start, start + length).

    `start == 0` means the slot's state is fresh (a new prefill); otherwise the slot already holds
    the state after `start` tokens. `logits` says which rows the last stage turns into logits.
    """

    seq_id: int
    slot: int
    start: int
    length: int
    logits: LogitsMode = "last"

    @property
    def is_decode(self) -> bool:
        return self.length == 1 and self.start > 0


@dataclass(frozen=True, slots=True)
class StepMessage:
    """One micro-batch: its segments (tokens packed in this order) and slots to free first."""

    step_id: int
    segments: tuple[Segment, ...]
    free: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.segments)

    def logit_rows(self) -> list[int]:
        """Packed row indices whose logits the last stage returns, in segment order."""
        rows, offset = [], 0
        for s in self.segments:
            if s.logits == "all":
                rows.extend(range(offset, offset + s.length))
            elif s.logits == "last":
                rows.append(offset + s.length - 1)
            offset += s.length
        return rows
