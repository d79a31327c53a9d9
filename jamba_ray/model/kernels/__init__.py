"""Kernels for Jamba's Mamba and attention layers, chosen per call, each self-checked before use.

For each op the candidates run in order, the first that can take the inputs and has passed its
self-check (`selfcheck.py`, once per device and dtype, against the torch reference in
`reference.py`) is used:

- conv_update: causal-conv1d's `causal_conv1d_update` (CUDA), then our Triton kernel;
- ssm_update: mamba-ssm's `selective_state_update` (CUDA), then ours;
- varlen_scan: ours (no package scans Mamba-1 chunks from slots emitting states at positions);
- paged_decode: flash-attn's `flash_attn_with_kvcache` (CUDA, fp16/bf16, 256-token blocks), then
  our Triton paged kernel;
- prefill: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16); else the model's torch path.

Our kernels run where Triton can (CUDA tensors, or any tensors under TRITON_INTERPRET=1); the
packages only on CUDA (`packages.py`). A candidate that fails its check, or raises on a real call,
is disabled for the process with a warning and a `kernel_fallbacks` count. All candidates have the
reference's signature, result and in-place effect on the state pool. State arguments are one
layer's view of the pool (`pool.conv[i]`, `pool.ssm[i]`), updated in place at the given slots only.

Slots within one call must be distinct: two rows writing the same slot is a race in the kernel
(the fixed-shape decode step's padding rows all write the scratch slot, whose content nobody reads).
Model code asks `pick` (None: its own torch path), which offers kernels where `enabled_for` says
so: CUDA tensors. `moe.py` (grouped MoE) is plain torch, not Triton, and is imported on its own.
TRITON_INTERPRET is read when the kernel modules are first imported (Triton decides at decoration
time), so set it before the first call.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from . import packages, probes, selfcheck
from .reference import conv_update_ref, paged_decode_ref, prefill_ref, scan_ref, ssm_update_ref

__all__ = [
    "available",
    "conv_update",
    "enabled_for",
    "impl",
    "paged_decode",
    "pick",
    "ssm_update",
    "varlen_scan",
]


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """True when Triton imports and can run here: a CUDA device, or TRITON_INTERPRET=1."""
    return _triton_importable() and (_interpret() or torch.cuda.is_available())


def _use_kernel(t: torch.Tensor) -> bool:
    return available() and (t.is_cuda or _interpret())


def enabled_for(t: torch.Tensor) -> bool:
    """Whether the model's layers call these kernels for tensors like `t`: CUDA tensors. (CPU
    tensors keep the torch paths; tests patch this to run our kernels there under the
    interpreter.)"""
    return t.is_cuda


def _ours(module: str, fn: str):
    """Loader of our Triton kernel `module.fn`: imported only where Triton can run it."""

    def load(t: torch.Tensor, **_):
        if not _use_kernel(t):
            return None
        return getattr(importlib.import_module(f".{module}", __name__), fn)

    return load


# op -> (kernel name, loader(t, **ctx) -> implementation or None), in order of preference
CANDIDATES = {
    "conv_update": (
        ("causal_conv1d_update", packages.conv_update),
        ("triton_conv_update", _ours("decode", "conv_update")),
    ),
    "ssm_update": (
        ("selective_state_update", packages.ssm_update),
        ("triton_ssm_update", _ours("decode", "ssm_update")),
    ),
    "varlen_scan": (("triton_varlen_scan", _ours("scan", "varlen_scan")),),
    "paged_decode": (
        ("flash_attn_with_kvcache", packages.paged_decode),
        ("triton_paged_decode", _ours("paged_attention", "paged_decode")),
    ),
    "prefill": (("flash_attn_varlen_func", packages.prefill),),
}
REFERENCE = {
    "conv_update": conv_update_ref,
    "ssm_update": ssm_update_ref,
    "varlen_scan": scan_ref,
    "paged_decode": paged_decode_ref,
    "prefill": prefill_ref,
}


def choose(op: str, t: torch.Tensor, **ctx) -> tuple[str, object] | None:
    """(kernel name, implementation) of `op` for inputs like `t` (its device and dtype; ctx: the
    paged op's `block_size`): the first candidate that loads and passes its self-check."""
    for name, load in CANDIDATES[op]:
        fn = load(t, **ctx)
        if fn is not None and probes.check(op, name, fn, REFERENCE[op], t.device, t.dtype):
            return name, fn
    return None


_impls: dict[tuple, object] = {}  # the choice per (op, device, dtype, ctx, verdict generation)


def impl(op: str, t: torch.Tensor, **ctx):
    """`op`'s kernel for inputs like `t`, guarded (a call that raises disables it and answers with
    the reference), or None when no kernel can run them. Cached: layers ask on every step."""
    key = (op, t.device, t.dtype, *ctx.items(), selfcheck.generation())
    if key in _impls:
        return _impls[key]
    chosen = choose(op, t, **ctx)
    fn = chosen and selfcheck.guarded(chosen[0], chosen[1], REFERENCE[op], t.device, t.dtype)
    if not selfcheck.capturing():  # a choice made while capturing skipped the checks
        _impls[key] = fn
    return fn


def pick(op: str, t: torch.Tensor, **ctx):
    """What the model's layers call: `impl` where `enabled_for(t)`, else None (their torch path)."""
    return impl(op, t, **ctx) if enabled_for(t) else None


def conv_update(x, conv_state, weight, bias, slots, silu: bool = False) -> torch.Tensor:
    """Decode-time causal conv step for one Mamba layer, one token per row.

    x [B, DI] (model dtype); conv_state [S, DI, K] (any dtype, usually the model's), updated in
    place: for each row b, conv_state[slots[b]] shifts left by one and appends x[b]. weight [DI, K]
    or nn.Conv1d's [DI, 1, K]; bias [DI] or None; slots [B] int (distinct, any order).
    Returns out [B, DI] in x's dtype: the depthwise dot product of the new window with `weight`,
    plus bias, then SiLU if `silu` (mamba.py's `conv_step` followed by `mixer.act`), computed in
    fp32 and rounded once. Other slots are untouched.
    """
    return (impl("conv_update", x) or REFERENCE["conv_update"])(
        x, conv_state, weight, bias, slots, silu=silu
    )


def ssm_update(u, dt, A, B, C, ssm, slots, D=None, z=None) -> torch.Tensor:
    """Decode-time selective state update for one Mamba layer, one token per row.

    u [B, DI] (conv output after SiLU); dt [B, DI] after dt_proj bias and softplus (fp32);
    A [DI, N] (= -exp(A_log), fp32); B, C [B, N] (after their RMSNorms); ssm [S, DI, N] fp32,
    updated in place: s = slots[b]; ssm[s] = exp(dt*A) * ssm[s] + dt * B * u.
    D [DI] or None adds D*u; z [B, DI] or None multiplies by silu(z) (the gate half of in_proj).
    Returns y [B, DI] in u's dtype: ssm[s]·C (+ D*u) (* silu(z)), all math in fp32.
    """
    return (impl("ssm_update", u) or REFERENCE["ssm_update"])(u, dt, A, B, C, ssm, slots, D=D, z=z)


def varlen_scan(u, dt, A, B, C, ssm, cu_seqlens, slots, D=None, z=None, emit=None):
    """Selective scan over G packed segments (prefill chunks), each from and back into its slot.

    u, dt [T, DI] (dt softplus'ed, fp32); B, C [T, N]; A [DI, N]; ssm [S, DI, N] fp32.
    cu_seqlens [G+1] int: segment g is packed rows cu_seqlens[g]:cu_seqlens[g+1] (on u's device);
    slots [G] int: segment g starts from ssm[slots[g]] (a chunk continuing a sequence starts from
    its state so far) and its final state is written back there. D, z as in `ssm_update`.
    emit: None, or (segment, token offset) pairs (a list or an [E, 2] int tensor, distinct):
    the state just after that token is returned. Offsets are within the segment.
    Returns (y [T, DI] in u's dtype, emitted [E, DI, N] fp32; E = 0 without `emit`).
    Emit positions are checked against cu_seqlens only for CPU tensors (no device sync on CUDA).
    """
    return (impl("varlen_scan", u) or REFERENCE["varlen_scan"])(
        u, dt, A, B, C, ssm, cu_seqlens, slots, D=D, z=z, emit=emit
    )


def paged_decode(q, k_pool, v_pool, block_tables, seq_lens, scale: float) -> torch.Tensor:
    """Decode attention over paged KV, one query token per row.

    q [B, nh, hd]; k_pool, v_pool [NBLK, kvh, bs, hd] (one layer's blocks; nh % kvh == 0, query
    head h reads kv head h // (nh // kvh)); block_tables [B, max_blocks] int (padded: entries past
    a row's length are never read); seq_lens [B] int: row b attends to its positions
    [0, seq_lens[b]) (its decode position + 1), position p at block_tables[b, p // bs], offset
    p % bs. scale: the softmax scale. Returns out [B, nh, hd] in q's dtype, softmax and sums in
    fp32; a row of length 0 gives zeros (ours and the reference; flash-attn is not checked for
    that: the model's decode rows always hold their own token). Nothing is written to the pools.
    """
    return (impl("paged_decode", q, block_size=k_pool.shape[2]) or REFERENCE["paged_decode"])(
        q, k_pool, v_pool, block_tables, seq_lens, scale
    )
