"""Where each segment's tokens sit in the packed [T, H] batch, as index tensors for one forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.messages import StepMessage


@dataclass(frozen=True, slots=True)
class Chunk:
    """A prefill (or multi-token) segment: packed rows [row, row + n) at positions
    [start, start + n), its KV in `blocks` (its table up to position start + n)."""

    slot: int
    row: int
    n: int
    start: int
    blocks: torch.Tensor  # [ceil((start + n) / block_size)]
    # (m, checkpoint): the Mamba state after the chunk's first m tokens (0 < m < n) goes there
    # (one after all n is the slot's own final state: `StatePool.emit_ends` copies it)
    emits: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Layout:
    decode_rows: torch.Tensor  # [D] packed rows of single-token decode segments
    decode_slots: torch.Tensor  # [D]
    decode_pos: torch.Tensor  # [D] position of each decode token
    chunks: tuple[Chunk, ...]
    decode_span: (
        tuple[int, int] | None
    )  # (first slot, count) when rows 0..D-1 hold consecutive slots
    logit_rows: torch.Tensor  # [R]
    score_rows: torch.Tensor  # [C] rows for the classification head
    num_tokens: int
    kv_len: int = 0  # keys a decode row may attend to: max decode position + 1, known on the host
    block_size: int = 16
    decode_wblock: torch.Tensor | None = None  # [D] block each decode row writes its K/V into
    decode_woff: torch.Tensor | None = None  # [D] offset in that block
    decode_blocks: tuple[torch.Tensor, ...] = ()  # per decode row: its own blocks up to its length
    decode_table: torch.Tensor | None = None  # [D, NB] fixed shapes only: padded tables, masked

    @property
    def num_decode(self) -> int:
        return len(self.decode_rows)

    @classmethod
    def build(
        cls,
        msg: StepMessage,
        tables: dict[int, list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> Layout:
        """`tables`: each sequence's KV block table, as the stage holds it."""
        rows, slots, pos, chunks, own, offset = [], [], [], [], [], 0

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        for s in msg.segments:
            table = tables[s.seq_id]
            if s.is_decode:
                rows.append(offset)
                slots.append(s.slot)
                pos.append(s.start)
                own.append(table[: s.start // block_size + 1])
            else:
                blocks = t(table[: -(-s.end // block_size)])
                inside = tuple((p - s.start, c) for p, c in s.emits if p < s.end)
                chunks.append(Chunk(s.slot, offset, s.length, s.start, blocks, inside))
            offset += s.length
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
            block_size,
            t([b[-1] for b in own]),
            t([p % block_size for p in pos]),
            tuple(t(b) for b in own),
        )

    @classmethod
    def fixed_decode(
        cls,
        slots: torch.Tensor,
        pos: torch.Tensor,
        table: torch.Tensor,
        wblock: torch.Tensor,
        block_size: int,
    ) -> Layout:
        """B decode rows at fixed shapes: slots, positions, tables [B, NB] and the block each row
        writes are buffers filled before each run; attention reads NB blocks, masked by position."""
        rows = torch.arange(len(slots), device=slots.device)
        return cls(
            rows,
            slots,
            pos,
            (),
            None,
            rows,
            rows[:0],
            len(slots),
            table.shape[1] * block_size,
            block_size,
            wblock,
            pos % block_size,
            (),
            table,
        )

    def decode_state(self, pool: torch.Tensor) -> torch.Tensor:
        """The decode rows' slots of a per-layer state [S, ...]: a view when consecutive, else a
        copy."""
        if self.decode_span is not None:
            first, n = self.decode_span
            return pool[first : first + n]
        return pool[self.decode_slots]

    def store_decode_state(self, pool: torch.Tensor, value: torch.Tensor) -> None:
        if self.decode_span is not None:
            first, n = self.decode_span
            if pool[first : first + n].data_ptr() != value.data_ptr():
                pool[first : first + n] = value
            return
        pool[self.decode_slots] = value
