"""Triton paged decode attention: one query token per row over that row's KV blocks, in place.

Grid: (row, kv head). A program holds the row's query heads that share the kv head (the GQA group,
padded to 16 rows so both products run as `tl.dot`) and walks the row's positions [0, len) a tile
at a time: each position's block comes from the row's table, so a row reads only its own blocks,
up to its own length, whatever the table's padding or the batch's longest row. Softmax is online
(running max and sum in fp32), the output normalised once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import same_device

LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    sq_b,
    sq_h,
    sq_d,
    sk_n,
    sk_h,
    sk_p,
    sk_d,
    sv_n,
    sv_h,
    sv_p,
    sv_d,
    st_b,
    st_n,
    so_b,
    so_h,
    so_d,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BS: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    TILE: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)  # [BLOCK_G] query heads of this group (padded)
    d = tl.arange(0, BLOCK_HD)  # [BLOCK_HD]
    t = tl.arange(0, TILE)  # [TILE] positions of one tile
    gmask = g < GROUP
    dmask = d < HD
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + row * sq_b + heads[:, None] * sq_h + d[None, :] * sq_d,
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_HD], the model dtype
    n = tl.load(lens_ptr + row).to(tl.int64)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (base-2 logits)
    l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exponentials  # noqa: E741
    acc = tl.zeros([BLOCK_G, BLOCK_HD], tl.float32)
    k_head, v_head = k_ptr + kvh * sk_h, v_ptr + kvh * sv_h
    for start in range(0, n, TILE):
        pos = start + t  # [TILE]
        valid = pos < n
        blk = tl.load(table_ptr + row * st_b + (pos // BS) * st_n, mask=valid, other=0)
        blk = blk.to(tl.int64)
        off = pos % BS
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(
            k_head + blk[:, None] * sk_n + off[:, None] * sk_p + d[None, :] * sk_d,
            mask=kv_mask,
            other=0.0,
        )  # [TILE, BLOCK_HD]
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = s * qk_scale  # [BLOCK_G, TILE]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds a valid position
        alpha = tl.exp2(m - m_new)  # [BLOCK_G]; 0 on the first tile
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_G, TILE]
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        v = tl.load(
            v_head + blk[:, None] * sv_n + off[:, None] * sv_p + d[None, :] * sv_d,
            mask=kv_mask,
            other=0.0,
        )  # [TILE, BLOCK_HD]
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:  # probabilities rounded to the model dtype: tensor cores, as flash attention does
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a row of length 0 gets zeros
    tl.store(
        out_ptr + row * so_b + heads[:, None] * so_h + d[None, :] * so_d,
        out.to(out_ptr.dtype.element_ty),
        mask=gmask[:, None] & dmask[None, :],
    )


def paged_decode(q, k_pool, v_pool, block_tables, seq_lens, scale: float, tile=None):
    """Paged decode attention: see `jamba_ray.model.kernels.paged_decode`."""
    b, nh, hd = q.shape
    kvh, bs = k_pool.shape[1], k_pool.shape[2]
    if nh % kvh:
        raise ValueError(f"{nh} query heads do not group over {kvh} kv heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or seq_lens.shape != (b,):
        raise ValueError("block_tables must be [B, max_blocks] and seq_lens [B]")
    same_device(q, k_pool, v_pool, block_tables, seq_lens)
    out = torch.empty_like(q)  # [B, nh, hd]
    if b == 0:
        return out
    group = nh // kvh
    _paged_decode_kernel[(b, kvh)](
        q,
        k_pool,
        v_pool,
        block_tables,
        seq_lens,
        out,
        float(scale) * LOG2E,
        *q.stride(),
        *k_pool.stride(),
        *v_pool.stride(),
        *block_tables.stride(),
        *out.stride(),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs 16 rows
        BS=bs,
        HD=hd,
        BLOCK_HD=max(16, triton.next_power_of_2(hd)),
        TILE=tile or 64,  # positions per step: several blocks when blocks are small
        # Triton 3.9's interpreter misreads bf16 operands of tl.dot: on CPU tensors (the
        # interpreter) both products take fp32 operands.
        DOT_F32=q.device.type == "cpu" or q.dtype == torch.float32,
    )
    return out
