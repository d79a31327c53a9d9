"""Where each segment's tokens sit in the packed [T, H] batch, as index tensors for one forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sequence import StepMessage


@dataclass(frozen=True, slots=True)
class Chunk:
    """A prefill (or multi-token) segment: packed rows [row, row + n) at positions [start, start + n)."""

    slot: int
    row: int
    n: int
    start: int


@dataclass(frozen=True, slots=True)
class Layout:
    decode_rows: torch.Tensor  # [D] packed rows of single-token decode segments
    decode_slots: torch.Tensor  # [D]
    decode_pos: torch.Tensor  # [D] position of each decode token
    chunks: tuple[Chunk, ...]
    logit_rows: torch.Tensor  # [R]
    score_rows: torch.Tensor  # [C] rows for the classification head
    num_tokens: int

    @property
    def num_decode(self) -> int:
        return len(self.decode_rows)

    @classmethod
    def build(cls, msg: StepMessage, device: torch.device | str = "cpu") -> Layout:
        rows, slots, pos, chunks, offset = [], [], [], [], 0
        for s in msg.segments:
            if s.is_decode:
                rows.append(offset)
                slots.append(s.slot)
                pos.append(s.start)
            else:
                chunks.append(Chunk(s.slot, offset, s.length, s.start))
            offset += s.length

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        return cls(t(rows), t(slots), t(pos), tuple(chunks), t(msg.logit_rows()), t(msg.score_rows()), offset)
