"""Preallocated per-sequence state of one stage's layers, addressed by integer slot handles."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class PoolShape:
    n_mamba: int
    n_attn: int
    slots: int
    max_len: int
    d_inner: int
    d_conv: int
    d_state: int
    kv_heads: int
    head_dim: int


class StatePool:
    """Mamba conv/SSM states `[n_mamba, slots, ...]` and KV
    `[n_attn, slots, kv_heads, max_len, hd]`.

    The engine alone hands slots out and takes them back: the pool holds no ownership of its own.
    """

    def __init__(self, shape: PoolShape, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.shape = shape
        ssm_dtype = torch.float32  # the SSM state is kept in fp32 below fp32, as the reference does
        s = shape
        self.conv = torch.zeros(s.n_mamba, s.slots, s.d_inner, s.d_conv, dtype=dtype, device=device)
        self.ssm = torch.zeros(
            s.n_mamba, s.slots, s.d_inner, s.d_state, dtype=ssm_dtype, device=device
        )
        kv = (s.n_attn, s.slots, s.kv_heads, s.max_len, s.head_dim)
        self.k = torch.zeros(kv, dtype=dtype, device=device)
        self.v = torch.zeros(kv, dtype=dtype, device=device)

    def check(self, slot: int, end: int) -> None:
        if not 0 <= slot < self.shape.slots:
            raise ValueError(f"slot {slot} outside the pool (0..{self.shape.slots - 1})")
        if end > self.shape.max_len:
            raise ValueError(f"position {end} beyond the pool's max length {self.shape.max_len}")

    def start(self, slot: int) -> None:
        """A fresh sequence takes `slot`: its Mamba state starts at zero (KV is masked by
        length)."""
        self.conv[:, slot].zero_()
        self.ssm[:, slot].zero_()

    def fork(self, src: int, dsts: list[int], length: int) -> None:
        """Copy `src`'s state after `length` tokens into each of `dsts` (n > 1 without
        re-prefill)."""
        for d in dsts:
            self.conv[:, d].copy_(self.conv[:, src])
            self.ssm[:, d].copy_(self.ssm[:, src])
            self.k[:, d, :, :length].copy_(self.k[:, src, :, :length])
            self.v[:, d, :, :length].copy_(self.v[:, src, :, :length])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm, self.k, self.v))
