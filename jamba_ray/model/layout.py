"""Where each segment's tokens sit in the packed [T, H] batch, as index tensors for one forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.messages import StepMessage


@dataclass(frozen=True, slots=True)
class Chunk:
    """A prefill (or multi-token) segment: packed rows [row, row + n) at positions
    [start, start + n)."""

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
    decode_span: (
        tuple[int, int] | None
    )  # (first slot, count) when decode rows 0..D-1 hold consecutive slots
    logit_rows: torch.Tensor  # [R]
    score_rows: torch.Tensor  # [C] rows for the classification head
    num_tokens: int
    kv_len: int = 0  # keys a decode row may attend to: max decode position + 1, known on the host

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

        span = None
        if (
            slots
            and rows == list(range(len(rows)))
            and slots == list(range(slots[0], slots[0] + len(slots)))
        ):
            span = (slots[0], len(slots))
        return cls(
            t(rows),
            t(slots),
            t(pos),
            tuple(chunks),
            span,
            t(msg.logit_rows()),
            t(msg.score_rows()),
            offset,
            max(pos, default=-1) + 1,
        )

    @classmethod
    def fixed_decode(cls, slots: torch.Tensor, pos: torch.Tensor, kv_len: int) -> Layout:
        """B decode rows at fixed shapes: slots/positions are buffers filled before each run."""
        rows = torch.arange(len(slots), device=slots.device)
        empty = rows[:0]
        return cls(rows, slots, pos, (), None, rows, empty, len(slots), kv_len)

    def decode_state(self, pool: torch.Tensor) -> torch.Tensor:
        """The decode rows' slots of a per-layer state [S, ...]: a view when consecutive, else a
        copy."""
        if self.decode_span is not None:
            first, n = self.decode_span
            return pool[first : first + n]
        return pool[self.decode_slots]

    def decode_kv(self, pool: torch.Tensor) -> torch.Tensor:
        """The decode rows' first `kv_len` positions of a KV pool [S, kvh, max_len, hd]."""
        if self.decode_span is not None:
            first, n = self.decode_span
            return pool[first : first + n, :, : self.kv_len]
        return pool[self.decode_slots, :, : self.kv_len]  # gathers only kv_len positions

    def store_decode_state(self, pool: torch.Tensor, value: torch.Tensor) -> None:
        if self.decode_span is not None:
            first, n = self.decode_span
            if pool[first : first + n].data_ptr() != value.data_ptr():
                pool[first : first + n] = value
            return
        pool[self.decode_slots] = value
