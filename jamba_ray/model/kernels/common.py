"""Argument checks and helpers shared by the kernel launchers and the torch references."""

from __future__ import annotations

import torch


def flat(v: torch.Tensor | None) -> torch.Tensor | None:
    """Per-channel vectors ([DI]) are read by the kernels with unit stride."""
    return v.contiguous() if v is not None else None


def same_device(ref: torch.Tensor, *tensors) -> None:
    """Kernels take raw pointers: a tensor left on another device would be read as garbage."""
    for t in tensors:
        if t is not None and t.device != ref.device:
            raise ValueError(f"kernel input on {t.device}, expected {ref.device}")


def fp32_state(ssm: torch.Tensor) -> None:
    """The scan carries the state in fp32 registers and stores it back as such."""
    if ssm.dtype != torch.float32:
        raise ValueError(f"SSM state must be fp32, got {ssm.dtype}")


def emit_rows(cu_seqlens: torch.Tensor, emit) -> torch.Tensor:
    """Packed row of each emitted (segment, token offset) pair, validated: [E] int64 on cu's device.

    Validation reads `cu_seqlens` on the host, so it is skipped (trusted) for CUDA tensors to keep
    the launch free of a device sync.
    """
    dev = cu_seqlens.device
    pairs = torch.as_tensor(emit, dtype=torch.long).reshape(-1, 2).to(dev)  # [E, 2]
    seg, off = pairs[:, 0], pairs[:, 1]
    if dev.type == "cpu" and len(pairs):
        g = len(cu_seqlens) - 1
        if bool((seg < 0).any() or (seg >= g).any()):
            raise ValueError(f"emit segment outside 0..{g - 1}")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        if bool((off < 0).any() or (off >= lengths[seg]).any()):
            raise ValueError("emit offset outside its segment")
    rows = cu_seqlens.long()[seg] + off
    if dev.type == "cpu" and len(rows.unique()) != len(rows):
        raise ValueError("emit positions must be distinct")
    return rows
