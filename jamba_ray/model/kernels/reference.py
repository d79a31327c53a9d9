"""Plain torch versions of the kernels: the specification each Triton kernel is tested against.

Mamba: same arithmetic as `mamba.py`'s torch path, except that every product and sum is taken in
fp32 and the result rounded once to the output dtype (the kernels do the same; `mamba.py`'s conv
works in the model dtype). State is gathered by slot, updated, and scattered back.
Paged decode attention: each row's keys gathered from its own blocks, a plain fp32 softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import emit_rows


def _weight_2d(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], weight.shape[-1])  # [DI, 1, K] (nn.Conv1d) -> [DI, K]


def conv_update_ref(x, conv_state, weight, bias, slots, silu: bool = False) -> torch.Tensor:
    """Reference for `decode.conv_update`: same signature and in-place effect on `conv_state`."""
    slots = slots.long()
    window = torch.cat([conv_state[slots][:, :, 1:], x[:, :, None].to(conv_state.dtype)], dim=-1)
    conv_state[slots] = window  # [B, DI, K]
    out = (window.float() * _weight_2d(weight).float()).sum(-1)  # [B, DI]
    if bias is not None:
        out = out + bias.float()
    if silu:
        out = F.silu(out)
    return out.to(x.dtype)


def _gate(y, u, D, z):
    """y [.., DI] fp32: add the D skip and apply the SiLU gate, as `mamba_mix` does after the
    SSM."""
    if D is not None:
        y = y + u * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y


def _step(state, u, dt, A, B, C):
    """One recurrence step for rows: state [R, DI, N], u/dt [R, DI], B/C [R, N] ->
    (state, y [R, DI])."""
    dA = torch.exp(dt[:, :, None] * A)  # [R, DI, N]
    dBu = dt[:, :, None] * B[:, None, :] * u[:, :, None]
    state = state * dA + dBu
    return state, (state * C[:, None, :]).sum(-1)


def ssm_update_ref(u, dt, A, B, C, ssm, slots, D=None, z=None) -> torch.Tensor:
    """Reference for `decode.ssm_update`: same signature and in-place effect on `ssm`."""
    slots = slots.long()
    uf = u.float()
    state, y = _step(ssm[slots], uf, dt.float(), A.float(), B.float(), C.float())
    ssm[slots] = state
    return _gate(y, uf, D, z).to(u.dtype)


def scan_ref(u, dt, A, B, C, ssm, cu_seqlens, slots, D=None, z=None, emit=None):
    """Reference for `scan.varlen_scan`: same signature, return value and in-place effect on
    `ssm`."""
    T, DI = u.shape
    rows = emit_rows(cu_seqlens, emit if emit is not None else []).tolist()
    emitted = torch.empty(len(rows), DI, A.shape[-1], dtype=torch.float32, device=u.device)
    uf, dtf, Af, Bf, Cf = u.float(), dt.float(), A.float(), B.float(), C.float()
    y = torch.empty(T, DI, dtype=torch.float32, device=u.device)
    bounds = cu_seqlens.tolist()
    for g, slot in enumerate(slots.tolist()):
        state = ssm[slot][None]  # [1, DI, N]
        for t in range(bounds[g], bounds[g + 1]):
            r = slice(t, t + 1)
            state, y[r] = _step(state, uf[r], dtf[r], Af, Bf[r], Cf[r])
            for e in (i for i, row in enumerate(rows) if row == t):
                emitted[e] = state[0]
        ssm[slot] = state[0]
    return _gate(y, uf, D, z).to(u.dtype), emitted


def paged_decode_ref(q, k_pool, v_pool, block_tables, seq_lens, scale: float) -> torch.Tensor:
    """Reference for `paged_attention.paged_decode`: row by row, over its first seq_lens[b] keys."""
    out = torch.zeros_like(q)  # [B, nh, hd]; a row of length 0 stays zero
    group = q.shape[1] // k_pool.shape[1]
    bs = k_pool.shape[2]
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        blocks = block_tables[b, : -(-n // bs)].long()
        keys = k_pool[blocks].transpose(0, 1).flatten(1, 2)[:, :n].float()  # [kvh, n, hd]
        values = v_pool[blocks].transpose(0, 1).flatten(1, 2)[:, :n].float()
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        scores = torch.einsum("hd,hnd->hn", q[b].float(), keys) * scale  # [nh, n]
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), values).to(q.dtype)
    return out


def prefill_ref(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """Reference for flash-attn's varlen prefill: q [Tq, nh, hd], k, v [Tk, kvh, hd]; segment g's
    queries cu_q[g]:cu_q[g+1] are its last positions of keys cu_k[g]:cu_k[g+1] (causal, aligned
    bottom-right). max_q, max_k are unused here. Returns [Tq, nh, hd] in q's dtype."""
    out = torch.empty_like(q)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for g in range(len(bq) - 1):
        n, m = bq[g + 1] - bq[g], bk[g + 1] - bk[g]
        query = q[bq[g] : bq[g + 1]].transpose(0, 1)[None].float()  # [1, nh, n, hd]
        keys = k[bk[g] : bk[g + 1]].transpose(0, 1)[None].float()  # [1, kvh, m, hd]
        values = v[bk[g] : bk[g + 1]].transpose(0, 1)[None].float()
        mask = (
            torch.arange(m, device=q.device)[None, :]
            <= torch.arange(m - n, m, device=q.device)[:, None]
        )
        o = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )  # [1, nh, n, hd]
        out[bq[g] : bq[g + 1]] = o[0].transpose(0, 1).to(q.dtype)
    return out
