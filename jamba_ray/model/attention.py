"""Jamba attention (no rotary embedding) over a packed batch, with KV in paged blocks.

A block table maps a sequence's positions to blocks of `block_size` tokens: position p lives in
block `table[p // block_size]` at offset `p % block_size`. Decode reads each row's own blocks up to
its own length (`decode_ref`, the torch reference: no padding to the batch's longest row); the
fixed-shape decode step (CUDA graphs) reads padded tables masked by position (`decode_padded`).
On CUDA both run as a paged kernel (`kernels.pick("paged_decode")`: flash-attn's
`flash_attn_with_kvcache` with a block table where it takes the pool, else our Triton kernel),
which reads the blocks in place: no gather of K/V, and each row stops at its own length even in a
padded table. Prefill chunks run as one flash-attn varlen call where it is installed (CUDA,
fp16/bf16), else chunk by chunk through torch's SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .layout import Layout


def attend(attn, x: torch.Tensor, lay: Layout, k_pool: torch.Tensor, v_pool: torch.Tensor):
    """x [T, H] -> [T, H]; k_pool/v_pool [blocks, kv_heads, block_size, hd] are this layer's."""
    t, hd = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(t, -1, hd)  # [T, nh, hd]
    k = attn.k_proj(x).view(t, -1, hd)  # [T, kvh, hd]
    v = attn.v_proj(x).view(t, -1, hd)
    out = torch.empty_like(q)
    if lay.num_decode:
        rows = lay.decode_rows
        block, off = _decode_targets(lay)
        k_pool[block, :, off] = k[rows]
        v_pool[block, :, off] = v[rows]
        out[rows] = _decode(attn, q[rows], lay, k_pool, v_pool)
    varlen = kernels.pick("prefill", q) if lay.chunks else None
    if varlen is not None:
        rows, o = _chunks_varlen(attn, varlen, q, k, v, lay, k_pool, v_pool)
        out[rows] = o
    for c in lay.chunks if varlen is None else ():
        out[c.row : c.row + c.n] = _chunk(attn, q, k, v, c, lay.block_size, k_pool, v_pool)
    return attn.o_proj(out.reshape(t, -1))


def _decode_targets(lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The block and offset each decode row writes its new K/V to."""
    if lay.decode_table is None:
        return lay.decode_wblock, lay.decode_woff
    pos = lay.decode_pos  # fixed shapes: computed inside the step, from the buffers
    block = lay.decode_table.gather(1, (pos // lay.block_size)[:, None])[:, 0]
    return block, pos % lay.block_size


def _decode(attn, q: torch.Tensor, lay: Layout, k_pool, v_pool) -> torch.Tensor:
    kernel = kernels.pick("paged_decode", q, block_size=lay.block_size)
    if kernel is not None:  # each row reads its own blocks in place, up to its length
        table = lay.decode_table
        if table is None:  # padding past a row's own blocks is never read
            table = torch.nn.utils.rnn.pad_sequence(list(lay.decode_blocks), batch_first=True)
        return kernel(q, k_pool, v_pool, table, lay.decode_pos + 1, attn.scaling)
    decode = decode_padded if lay.decode_table is not None else decode_ref
    return decode(attn, q, lay, k_pool, v_pool)


def gather(pool: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The first n positions held by `blocks` [NB]: [kvh, n, hd]."""
    kv = pool[blocks]  # [NB, kvh, bs, hd]
    return kv.transpose(0, 1).reshape(kv.shape[1], -1, kv.shape[3])[:, :n]


def decode_ref(attn, q: torch.Tensor, lay: Layout, k_pool, v_pool) -> torch.Tensor:
    """q [D, nh, hd] -> [D, nh, hd]: each row over its own positions [0, pos]."""
    out = torch.empty_like(q)
    for i, (blocks, p) in enumerate(zip(lay.decode_blocks, lay.decode_pos.tolist())):
        keys, values = gather(k_pool, blocks, p + 1), gather(v_pool, blocks, p + 1)
        o = F.scaled_dot_product_attention(
            q[i][None, :, None], keys[None], values[None], scale=attn.scaling, enable_gqa=True
        )  # [1, nh, 1, hd]
        out[i] = o[0, :, 0]
    return out


def decode_padded(attn, q: torch.Tensor, lay: Layout, k_pool, v_pool) -> torch.Tensor:
    """q [B, nh, hd] -> [B, nh, hd] at fixed shapes: tables [B, NB], masked by position."""
    table, n, kvh = lay.decode_table, lay.kv_len, k_pool.shape[1]
    b, nb = table.shape
    keys = k_pool[table.reshape(-1)].view(b, nb, *k_pool.shape[1:])  # [B, NB, kvh, bs, hd]
    values = v_pool[table.reshape(-1)].view(b, nb, *v_pool.shape[1:])
    keys = keys.transpose(1, 2).reshape(b, kvh, n, -1)  # [B, kvh, NB*bs, hd]
    values = values.transpose(1, 2).reshape(b, kvh, n, -1)
    mask = torch.arange(n, device=q.device)[None, :] <= lay.decode_pos[:, None]  # [B, n]
    o = F.scaled_dot_product_attention(
        q[:, :, None],
        keys,
        values,
        attn_mask=mask[:, None, None, :],
        scale=attn.scaling,
        enable_gqa=True,
    )  # [B, nh, 1, hd]
    return o[:, :, 0]


def _store(c, block_size: int, k, v, k_pool, v_pool) -> torch.Tensor:
    """Write chunk c's K/V [n, kvh, hd] into its blocks; returns its positions [n]."""
    positions = torch.arange(c.start, c.start + c.n, device=k.device)
    block, off = c.blocks[positions // block_size], positions % block_size
    k_pool[block, :, off] = k[c.row : c.row + c.n]
    v_pool[block, :, off] = v[c.row : c.row + c.n]
    return positions


def _chunks_varlen(attn, varlen, q, k, v, lay: Layout, k_pool, v_pool):
    """Every prefill chunk in one varlen call: each chunk's queries over its keys [0, end),
    causal aligned bottom-right. Returns the chunks' rows [Tc] and outputs [Tc, nh, hd]."""
    rows, keys, values, cu_q, cu_k = [], [], [], [0], [0]
    for c in lay.chunks:
        end = c.start + c.n
        _store(c, lay.block_size, k, v, k_pool, v_pool)
        keys.append(gather(k_pool, c.blocks, end).transpose(0, 1))  # [end, kvh, hd]
        values.append(gather(v_pool, c.blocks, end).transpose(0, 1))
        rows.append(torch.arange(c.row, c.row + c.n, device=q.device))
        cu_q.append(cu_q[-1] + c.n)
        cu_k.append(cu_k[-1] + end)
    rows = torch.cat(rows)
    max_q, max_k = max(c.n for c in lay.chunks), max(c.start + c.n for c in lay.chunks)
    cu = [torch.tensor(x, device=q.device) for x in (cu_q, cu_k)]
    o = varlen(q[rows], torch.cat(keys), torch.cat(values), *cu, max_q, max_k, attn.scaling)
    return rows, o


def _chunk(attn, q, k, v, c, block_size: int, k_pool, v_pool):
    end = c.start + c.n
    rows = slice(c.row, c.row + c.n)
    positions = _store(c, block_size, k, v, k_pool, v_pool)
    keys = gather(k_pool, c.blocks, end)[None]  # [1, kvh, end, hd]
    values = gather(v_pool, c.blocks, end)[None]
    query = q[rows].transpose(0, 1)[None]  # [1, nh, n, hd]
    if c.start == 0:
        o = F.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=attn.scaling, enable_gqa=True
        )
    else:
        mask = torch.arange(end, device=q.device)[None, :] <= positions[:, None]  # [n, end]
        o = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True
        )
    return o[0].transpose(0, 1)  # [n, nh, hd]
