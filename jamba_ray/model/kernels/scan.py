"""Triton varlen selective scan over the packed prefill chunks of a micro-batch.

One program per (segment, block of DI channels) walks that segment's tokens in order with its
[BLOCK_DI, N] state in registers: read from the segment's slot at the start, written back at the
end, and copied out after any token named in `emit` (prefix-cache checkpoints).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import emit_rows, flat, fp32_state, same_device


@triton.jit
def _scan_kernel(
    u_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    ssm_ptr,
    cu_ptr,
    slots_ptr,
    D_ptr,
    z_ptr,
    y_ptr,
    emit_idx_ptr,
    emit_ptr,
    DI,
    N,
    su_t,
    su_d,
    sdt_t,
    sdt_d,
    sA_d,
    sA_n,
    sB_t,
    sB_n,
    sC_t,
    sC_n,
    ss_s,
    ss_d,
    ss_n,
    sz_t,
    sz_d,
    sy_t,
    sy_d,
    se_e,
    se_d,
    se_n,
    BLOCK_DI: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_EMIT: tl.constexpr,
):
    seg = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_DI + tl.arange(0, BLOCK_DI)  # [BLOCK_DI]
    n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    dmask = d < DI
    nmask = n < N
    mask = dmask[:, None] & nmask[None, :]  # [BLOCK_DI, BLOCK_N]
    start = tl.load(cu_ptr + seg).to(tl.int64)
    end = tl.load(cu_ptr + seg + 1).to(tl.int64)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    state_p = ssm_ptr + slot * ss_s + d[:, None] * ss_d + n[None, :] * ss_n
    state = tl.load(state_p, mask=mask, other=0.0)  # [BLOCK_DI, BLOCK_N] fp32
    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=mask, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    for t in range(start, end):
        u = tl.load(u_ptr + t * su_t + d * su_d, mask=dmask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + t * sdt_t + d * sdt_d, mask=dmask, other=0.0).to(tl.float32)
        B = tl.load(B_ptr + t * sB_t + n * sB_n, mask=nmask, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + t * sC_t + n * sC_n, mask=nmask, other=0.0).to(tl.float32)
        # Padded lanes stay zero: A=0 gives dA=1 on a zero state, and B=C=0 there.
        state = state * tl.exp(dt[:, None] * A) + dt[:, None] * B[None, :] * u[:, None]
        y = tl.sum(state * C[None, :], axis=1)  # [BLOCK_DI]
        if HAS_D:
            y += u * Dv
        if HAS_Z:
            z = tl.load(z_ptr + t * sz_t + d * sz_d, mask=dmask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + t * sy_t + d * sy_d, y.to(y_ptr.dtype.element_ty), mask=dmask)
        if HAS_EMIT:
            e = tl.load(emit_idx_ptr + t)  # -1 where this token is not a checkpoint
            if e >= 0:
                e_p = emit_ptr + e.to(tl.int64) * se_e
                tl.store(e_p + d[:, None] * se_d + n[None, :] * se_n, state, mask=mask)
    tl.store(state_p, state, mask=mask)


def varlen_scan(u, dt, A, B, C, ssm, cu_seqlens, slots, D=None, z=None, emit=None, block_di=None):
    """Varlen selective scan in place on `ssm`: see `jamba_ray.model.kernels.varlen_scan`."""
    t, di = u.shape
    n = A.shape[-1]
    g = len(slots)
    y = torch.empty_like(u)  # [T, DI]
    D = flat(D)
    same_device(u, ssm, dt, A, B, C, cu_seqlens, slots, D, z)
    fp32_state(ssm)
    if len(cu_seqlens) != g + 1:
        raise ValueError(f"cu_seqlens needs {g + 1} boundaries for {g} slots")
    rows = emit_rows(cu_seqlens, emit if emit is not None else [])  # [E]
    emitted = torch.empty(len(rows), di, n, dtype=torch.float32, device=u.device)  # [E, DI, N]
    if g == 0:
        return y, emitted
    emit_idx = torch.full((max(t, 1),), -1, dtype=torch.int32, device=u.device)  # [T]
    emit_idx[rows] = torch.arange(len(rows), dtype=torch.int32, device=u.device)
    blk = block_di or min(64, triton.next_power_of_2(di))
    zs = z.stride() if z is not None else (0, 0)
    es = emitted.stride() if len(rows) else (0, 0, 0)
    _scan_kernel[(g, triton.cdiv(di, blk))](
        u,
        dt,
        A,
        B,
        C,
        ssm,
        cu_seqlens,
        slots,
        D if D is not None else u,
        z if z is not None else u,
        y,
        emit_idx,
        emitted if len(rows) else ssm,
        di,
        n,
        *u.stride(),
        *dt.stride(),
        *A.stride(),
        *B.stride(),
        *C.stride(),
        *ssm.stride(),
        *zs,
        *y.stride(),
        *es,
        BLOCK_DI=blk,
        BLOCK_N=triton.next_power_of_2(n),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_EMIT=len(rows) > 0,
    )
    return y, emitted
