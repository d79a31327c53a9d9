"""Jamba attention (no rotary embedding) over a packed batch, with KV kept in per-slot storage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import Layout


def attend(attn, x: torch.Tensor, lay: Layout, k_pool: torch.Tensor, v_pool: torch.Tensor):
    """x [T, H] -> [T, H]; k_pool/v_pool [S, kv_heads, max_len, hd] are this layer's slots."""
    t, hd = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(t, -1, hd)  # [T, nh, hd]
    k = attn.k_proj(x).view(t, -1, hd)  # [T, kvh, hd]
    v = attn.v_proj(x).view(t, -1, hd)
    out = torch.empty_like(q)
    if lay.num_decode:
        out[lay.decode_rows] = _decode(attn, q, k, v, lay, k_pool, v_pool)
    for c in lay.chunks:
        out[c.row : c.row + c.n] = _chunk(attn, q, k, v, c, k_pool, v_pool)
    return attn.o_proj(out.reshape(t, -1))


def _decode(attn, q, k, v, lay, k_pool, v_pool):
    rows, slots, pos = lay.decode_rows, lay.decode_slots, lay.decode_pos
    k_pool[slots, :, pos] = k[rows]
    v_pool[slots, :, pos] = v[rows]
    keys, values = lay.decode_kv(k_pool), lay.decode_kv(v_pool)  # [D, kvh, L, hd]
    mask = torch.arange(lay.kv_len, device=pos.device)[None, :] <= pos[:, None]  # [D, L]
    o = F.scaled_dot_product_attention(
        q[rows][:, :, None],
        keys,
        values,
        attn_mask=mask[:, None, None, :],
        scale=attn.scaling,
        enable_gqa=True,
    )  # [D, nh, 1, hd]
    return o[:, :, 0]


def _chunk(attn, q, k, v, c, k_pool, v_pool):
    end = c.start + c.n
    rows = slice(c.row, c.row + c.n)
    k_pool[c.slot, :, c.start : end] = k[rows].transpose(0, 1)
    v_pool[c.slot, :, c.start : end] = v[rows].transpose(0, 1)
    keys = k_pool[c.slot, :, :end][None]  # [1, kvh, end, hd]
    values = v_pool[c.slot, :, :end][None]
    query = q[rows].transpose(0, 1)[None]  # [1, nh, n, hd]
    if c.start == 0:
        o = F.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=attn.scaling, enable_gqa=True
        )
    else:
        qpos = torch.arange(c.start, end, device=q.device)
        mask = torch.arange(end, device=q.device)[None, :] <= qpos[:, None]  # [n, end]
        o = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True
        )
    return o[0].transpose(0, 1)  # [n, nh, hd]
