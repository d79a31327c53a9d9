"""Preallocated per-sequence state of one stage's layers, addressed by handles the engine gives.

- Mamba conv/SSM state: one slot per running sequence, `[n_mamba, slots, d_inner, d_conv|d_state]`
  (SSM in fp32), plus a pool of checkpoints of the same shape (prefix reuse).
- KV: fixed-size blocks, `[n_attn, blocks, kv_heads, block_size, head_dim]`; a sequence's block
  table maps its positions to blocks. Slots and blocks are sized independently.
The engine alone hands handles out and takes them back: the pool holds no ownership of its own.
`apply` carries out what one step message does to this state before its layers run (nothing else
changes the tables), `emit_ends` what it does after them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.messages import Segment, StepMessage


@dataclass(frozen=True, slots=True)
class PoolShape:
    n_mamba: int
    n_attn: int
    slots: int
    blocks: int
    block_size: int
    checkpoints: int
    max_len: int  # positions a sequence may reach
    d_inner: int
    d_conv: int
    d_state: int
    kv_heads: int
    head_dim: int


class StatePool:
    def __init__(self, shape: PoolShape, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.shape = s = shape
        ssm_dtype = torch.float32  # the SSM state is kept in fp32 below fp32, as the reference does

        def mamba(n: int, last: int, dt: torch.dtype) -> torch.Tensor:
            return torch.zeros(s.n_mamba, n, s.d_inner, last, dtype=dt, device=device)

        self.conv, self.ssm = mamba(s.slots, s.d_conv, dtype), mamba(s.slots, s.d_state, ssm_dtype)
        self.ckpt_conv = mamba(s.checkpoints, s.d_conv, dtype)
        self.ckpt_ssm = mamba(s.checkpoints, s.d_state, ssm_dtype)
        kv = (s.n_attn, s.blocks, s.kv_heads, s.block_size, s.head_dim)
        self.k = torch.zeros(kv, dtype=dtype, device=device)
        self.v = torch.zeros(kv, dtype=dtype, device=device)
        self.tables: dict[int, list[int]] = {}  # seq id -> its KV block table (as messages say)

    def apply(self, msg: StepMessage) -> list[tuple] | None:
        """A step's state operations, in the message's order: forget finished sequences' tables,
        copy blocks, fork slots, save checkpoints, export; then each segment's table and slot.
        Returns the export's host copies (`export`), or None when the step exports nothing."""
        for sid in msg.finished:
            self.tables.pop(sid, None)
        for src, dst in msg.copies:
            self.copy_block(src, dst)
        for f in msg.forks:
            self.fork(f.src, list(f.dsts))
        for slot, ckpt in msg.saves:
            self.save(slot, ckpt)
        exported = self.export(msg.export_ckpts, msg.export_blocks) if msg.num_exports else None
        for s in msg.segments:
            self._enter(s)
        return exported

    def _enter(self, s: Segment) -> None:
        """The segment's table (its delta on the kept head); a restored or fresh slot."""
        kept = self.tables.get(s.seq_id, [])[: s.table_start]
        table = self.tables[s.seq_id] = kept + list(s.blocks)
        self.check(s.slot, s.end, table)
        if s.restore is not None:
            self.restore(s.restore, s.slot)
        elif s.start == 0:
            self.start(s.slot)

    def emit_ends(self, msg: StepMessage) -> None:
        """After the layers ran: a checkpoint a segment emits at its end is its slot's state then
        (the Mamba layers write those inside a chunk as they run)."""
        for s in msg.segments:
            for p, ckpt in s.emits:
                if p == s.end:
                    self.save(s.slot, ckpt)

    def check(self, slot: int, end: int, table: list[int]) -> None:
        if not 0 <= slot < self.shape.slots:
            raise ValueError(f"slot {slot} outside the pool (0..{self.shape.slots - 1})")
        if end > self.shape.max_len:
            raise ValueError(f"position {end} beyond the pool's max length {self.shape.max_len}")
        if len(table) * self.shape.block_size < end:
            raise ValueError(f"a block table of {len(table)} blocks cannot hold {end} positions")

    def start(self, slot: int) -> None:
        """A fresh sequence takes `slot`: Mamba state starts at zero (KV is masked by position)."""
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()

    def fork(self, src: int, dsts: list[int]) -> None:
        """Copy slot `src`'s Mamba state into each of `dsts` (n > 1 without re-prefill)."""
        for d in dsts:
            self.conv[:, d].copy_(self.conv[:, src])
            self.ssm[:, d].copy_(self.ssm[:, src])

    def copy_block(self, src: int, dst: int) -> None:
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def save(self, slot: int, ckpt: int) -> None:
        self.ckpt_conv[:, ckpt].copy_(self.conv[:, slot])
        self.ckpt_ssm[:, ckpt].copy_(self.ssm[:, slot])

    def restore(self, ckpt: int, slot: int) -> None:
        self.conv[:, slot].copy_(self.ckpt_conv[:, ckpt])
        self.ssm[:, slot].copy_(self.ckpt_ssm[:, ckpt])

    def export(self, ckpts: tuple[int, ...], blocks: tuple[int, ...]) -> list[tuple]:
        """Host copies of checkpoints, then of KV blocks: one (a, b) pair each, in that order:
        conv [n_mamba, d_inner, d_conv] and ssm [n_mamba, d_inner, d_state] of a checkpoint,
        k and v [n_attn, kv_heads, block_size, head_dim] of a block."""
        out = [(_host(self.ckpt_conv[:, c]), _host(self.ckpt_ssm[:, c])) for c in ckpts]
        return out + [(_host(self.k[:, b]), _host(self.v[:, b])) for b in blocks]

    def load(self, ckpts: list[int], blocks: list[int], items: list[tuple]) -> None:
        """The inverse of `export`, into this pool (a replacement stage's)."""
        for c, (conv, ssm) in zip(ckpts, items):
            self.ckpt_conv[:, c].copy_(conv)
            self.ckpt_ssm[:, c].copy_(ssm)
        for b, (k, v) in zip(blocks, items[len(ckpts) :]):
            self.k[:, b].copy_(k)
            self.v[:, b].copy_(v)

    def nbytes(self) -> int:
        tensors = (self.conv, self.ssm, self.ckpt_conv, self.ckpt_ssm, self.k, self.v)
        return sum(t.numel() * t.element_size() for t in tensors)


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu", copy=True)
