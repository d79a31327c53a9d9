"""Jamba's Mamba mixer over a packed batch, with conv/SSM state read from and written to slots.

Same arithmetic as transformers' `JambaMambaMixer` reference path (conv update, selective state
update, sequential scan), but each segment starts from its slot's state, so prefill can be chunked.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import kernels
from .layout import Layout
from .scan import chunked_scan


def conv_step(xs, conv, lay: Layout, weight, bias):
    """One token per row: xs [D, DI]; conv state [S, DI, K] updated in place for decode slots."""
    kernel = kernels.pick("conv_update", xs)
    if kernel is not None:  # causal-conv1d or ours: in place at the rows' slots, no gather/scatter
        return kernel(xs, conv, weight, bias, lay.decode_slots)
    window = torch.cat([lay.decode_state(conv)[:, :, 1:], xs[:, :, None]], dim=-1)  # [D, DI, K]
    lay.store_decode_state(conv, window)
    # A depthwise dot product: cheaper than a conv1d call for one position per row.
    out = (window * weight[:, 0, :]).sum(-1)  # [D, DI]
    return out + bias if bias is not None else out


def conv_chunk(xs, conv, slot, weight, bias, emits=(), ckpt=None):
    """A run of tokens of one sequence: xs [n, DI] continues from conv state [DI, K] of `slot`.
    `emits` (m, c): the conv state after the first m tokens goes into checkpoint c of `ckpt`.

    The depthwise causal conv as K shifted multiply-adds over [n, DI] rows: the same sums as
    `F.conv1d(..., groups=DI)` (`conv_chunk_reference`) without transposing the tokens."""
    n, k = xs.shape[0], conv.shape[-1]
    full = torch.cat([conv[slot].t(), xs])  # [K + n, DI]: the state's K inputs, then the tokens
    conv[slot] = full[-k:].t()
    for m, c in emits:  # the state after m tokens: the last K inputs up to token m
        ckpt[c] = full[m : m + k].t()
    # sums in fp32 (as a conv kernel accumulates): bf16 would round after every term
    full, w = full.float(), weight[:, 0, :].float()  # w [DI, K]
    out = full[1 : n + 1] * w[:, 0]  # output t reads inputs t + 1 .. t + K of `full`
    for j in range(1, k):
        out.addcmul_(full[1 + j : n + 1 + j], w[:, j])
    out = out + bias.float() if bias is not None else out
    return out.to(xs.dtype)


def conv_chunk_reference(xs, conv, slot, weight, bias):
    """`conv_chunk` as transformers computes it: one grouped conv1d over [DI, K + n]."""
    k = conv.shape[-1]
    full = torch.cat([conv[slot], xs.t()], dim=-1)  # [DI, K+n]
    conv[slot] = full[:, -k:]
    return F.conv1d(full[None], weight, bias, groups=xs.shape[1])[0, :, 1:].t()  # [n, DI]


def ssm_step(u, dt, A, B, C, ssm, lay: Layout):
    """Selective state update for one token per row; ssm [S, DI, N] updated in place."""
    kernel = kernels.pick("ssm_update", u)
    if kernel is not None:  # mamba-ssm or ours, in place by slot; the caller applies D and gate
        return kernel(u, dt, A, B, C, ssm, lay.decode_slots)
    dA = torch.exp(dt[:, :, None] * A)  # [D, DI, N]
    dBu = dt[:, :, None] * B[:, None, :] * u[:, :, None]
    state = lay.decode_state(ssm) * dA + dBu
    lay.store_decode_state(ssm, state)
    return torch.matmul(state, C[:, :, None])[:, :, 0]  # [D, DI]


def ssm_scan(u, dt, A, B, C, ssm, slot, emits=(), ckpt=None):
    """Selective scan over one sequence's tokens [n, DI], from and back into ssm[slot] [DI, N];
    `emits` (m, c): the state after the first m tokens goes into checkpoint c of `ckpt`."""
    at = [m - 1 for m, _ in emits]  # (the state after token m - 1, counted from 0)
    y, final, emitted = chunked_scan(u, dt, A, B, C, ssm[slot], emit_at=at)
    ssm[slot] = final
    for (_, c), state in zip(emits, emitted):
        ckpt[c] = state
    return y  # [n, DI]


def scan_chunks(scan, uf, dt, A, B, C, ssm, chunks, ckpt=None):
    """The prefill chunks of a micro-batch through the varlen `scan` kernel at once, each from and
    back into its slot, their emits into `ckpt` (the torch path: `ssm_scan` chunk by chunk).
    Returns their rows [Tc] and outputs [Tc, DI]."""
    dev = uf.device
    rows = torch.cat([torch.arange(c.row, c.row + c.n, device=dev) for c in chunks])  # [Tc]
    cu = torch.tensor([0, *itertools.accumulate(c.n for c in chunks)], device=dev)  # [G+1]
    slots = torch.tensor([c.slot for c in chunks], device=dev)  # [G]
    emit = [(g, m - 1) for g, c in enumerate(chunks) for m, _ in c.emits]  # (segment, token)
    y, emitted = scan(uf[rows], dt[rows], A, B[rows], C[rows], ssm, cu, slots, emit=emit)
    if emit:
        ckpt[torch.tensor([k for c in chunks for _, k in c.emits], device=dev)] = emitted
    return rows, y


def mamba_mix(mixer, x: torch.Tensor, lay: Layout, conv, ssm, ckpt_conv=None, ckpt_ssm=None):
    """x [T, H] -> [T, H] for one Mamba layer; conv [S, DI, K] and ssm [S, DI, N] are its slots,
    ckpt_conv [P, DI, K] and ckpt_ssm [P, DI, N] its checkpoints (chunks' emits go there)."""
    dtype = x.dtype
    xs, gate = mixer.in_proj(x).chunk(2, dim=-1)  # [T, DI] each
    weight, bias = mixer.conv1d.weight, mixer.conv1d.bias  # [DI, 1, K], [DI]
    u = torch.empty_like(xs)
    if lay.num_decode:
        u[lay.decode_rows] = conv_step(xs[lay.decode_rows], conv, lay, weight, bias)
    for c in lay.chunks:
        rows = slice(c.row, c.row + c.n)
        u[rows] = conv_chunk(xs[rows], conv, c.slot, weight, bias, c.emits, ckpt_conv)
    u = mixer.act(u)

    r, n = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(mixer.x_proj(u), [r, n, n], dim=-1)
    dt = mixer.dt_layernorm(dt) @ mixer.dt_proj.weight.t()  # [T, DI], bias added in fp32 below
    dt = F.softplus(dt.float() + mixer.dt_proj.bias.float())
    B, C = mixer.b_layernorm(B).float(), mixer.c_layernorm(C).float()
    A = -torch.exp(mixer.A_log.float())  # [DI, N]
    uf = u.float()

    y = torch.empty_like(uf)
    if lay.num_decode:
        d = lay.decode_rows
        y[d] = ssm_step(uf[d], dt[d], A, B[d], C[d], ssm, lay)
    scan = kernels.pick("varlen_scan", uf) if lay.chunks else None
    if scan is not None:  # ours: every chunk in one launch, by slot
        rows, y_chunks = scan_chunks(scan, uf, dt, A, B, C, ssm, lay.chunks, ckpt_ssm)
        y[rows] = y_chunks
    else:
        for c in lay.chunks:
            s = slice(c.row, c.row + c.n)
            y[s] = ssm_scan(uf[s], dt[s], A, B[s], C[s], ssm, c.slot, c.emits, ckpt_ssm)
    y = (y + uf * mixer.D.float()) * F.silu(gate.float())
    return mixer.out_proj(y.to(dtype))
