"""The `cuda` extra's kernel packages, adapted to the signatures of our ops (see `__init__.py`).

- causal-conv1d `causal_conv1d_update(..., conv_state_indices=)`: the decode conv step in place at
  the rows' slots of the [S, DI, K] pool (state_len = K >= width - 1 keeps our window layout).
- mamba-ssm `selective_state_update(..., state_batch_indices=)`: the decode SSM update in place by
  slot in the [S, DI, N] fp32 pool.
- flash-attn `flash_attn_with_kvcache(..., block_table=)`: paged decode attention, reading our
  [NBLK, kvh, bs, hd] pool through a [NBLK, bs, kvh, hd] view. FlashAttention-2 needs a block size
  divisible by 256 and fp16/bf16, so with the default 16-token blocks our Triton kernel runs.
- flash-attn `flash_attn_varlen_func`: prefill chunks in one call, causal aligned bottom-right
  (a chunk continuing a sequence attends to its earlier positions), fp16/bf16.

Each loader returns the adapter, or None when the package is missing, too old to address states
by slot, or cannot take these inputs. Only CUDA tensors reach them; none of this runs on the CPU.
"""

from __future__ import annotations

import functools
import inspect

import torch

HALF = (torch.float16, torch.bfloat16)


def on_gpu(t: torch.Tensor) -> bool:
    """The packages' kernels are CUDA-only. (Tests patch this to run the adapters on stand-ins.)"""
    return t.is_cuda


@functools.cache
def _import(module: str, attr: str, needs: str | None = None):
    """module.attr, or None if it does not import (or lacks keyword `needs`)."""
    try:
        fn = getattr(__import__(module, fromlist=[attr]), attr)
    except Exception:  # not installed, or built against another torch: the fallback runs
        return None
    if needs is not None and needs not in inspect.signature(fn).parameters:
        return None
    return fn


def installed() -> dict[str, bool]:
    """Which packages import here (for gpu_check's report)."""
    return {
        "flash-attn": _import("flash_attn", "flash_attn_varlen_func") is not None,
        "causal-conv1d": _import("causal_conv1d", "causal_conv1d_update") is not None,
        "mamba-ssm": _import(
            "mamba_ssm.ops.triton.selective_state_update", "selective_state_update"
        )
        is not None,
    }


def conv_update(t: torch.Tensor, **_):
    fn = _import("causal_conv1d", "causal_conv1d_update", "conv_state_indices")
    if fn is None or not on_gpu(t):
        return None

    def run(x, conv_state, weight, bias, slots, silu: bool = False):
        w = weight.reshape(weight.shape[0], weight.shape[-1])  # [DI, K]
        act = "silu" if silu else None
        return fn(x, conv_state, w, bias, act, conv_state_indices=slots.to(torch.int32))

    return run


def ssm_update(t: torch.Tensor, **_):
    fn = _import(
        "mamba_ssm.ops.triton.selective_state_update",
        "selective_state_update",
        "state_batch_indices",
    )
    if fn is None or not on_gpu(t):
        return None

    def run(u, dt, A, B, C, ssm, slots, D=None, z=None):
        return fn(ssm, u, dt, A, B, C, D=D, z=z, state_batch_indices=slots.to(torch.int32))

    return run


def paged_decode(t: torch.Tensor, block_size: int = 0, **_):
    fn = _import("flash_attn", "flash_attn_with_kvcache")
    if fn is None or not on_gpu(t) or t.dtype not in HALF or block_size % 256:
        return None

    def run(q, k_pool, v_pool, block_tables, seq_lens, scale: float):
        out = fn(
            q[:, None],  # [B, 1, nh, hd]
            k_pool.transpose(1, 2),  # [NBLK, bs, kvh, hd]: a view, last dim contiguous
            v_pool.transpose(1, 2),
            cache_seqlens=seq_lens.to(torch.int32),
            block_table=block_tables.to(torch.int32),
            softmax_scale=scale,
        )
        return out[:, 0]  # [B, nh, hd]

    return run


def prefill(t: torch.Tensor, **_):
    fn = _import("flash_attn", "flash_attn_varlen_func")
    if fn is None or not on_gpu(t) or t.dtype not in HALF:
        return None

    def run(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
        return fn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                  softmax_scale=scale, causal=True)  # fmt: skip

    return run
