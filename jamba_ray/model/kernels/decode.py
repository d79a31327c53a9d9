"""Triton decode kernels for one Mamba layer: conv window update and selective state update.

Both update the per-layer state pool in place at the rows' slots (no gather/scatter of whole
states). Grid: (batch row, block of DI channels); each program owns its channels of one slot, so
programs never touch the same state elements as long as the slots are distinct.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import flat, fp32_state, same_device


@triton.jit
def _conv_update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    bias_ptr,
    slots_ptr,
    out_ptr,
    DI,
    sx_b,
    sx_d,
    ss_s,
    ss_d,
    ss_k,
    sw_d,
    sw_k,
    so_b,
    so_d,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DI: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    row = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_DI + tl.arange(0, BLOCK_DI)  # [BLOCK_DI]
    k = tl.arange(0, BLOCK_K)  # [BLOCK_K]; K padded to a power of two
    dmask = d < DI
    kmask = k < K
    slot = tl.load(slots_ptr + row).to(tl.int64)
    state = state_ptr + slot * ss_s + d[:, None] * ss_d  # [BLOCK_DI, 1] pointers
    # Shifted window: position k takes the old k+1; the last position takes the new input.
    old = tl.load(
        state + (k[None, :] + 1) * ss_k, mask=dmask[:, None] & (k[None, :] < K - 1), other=0.0
    )  # [BLOCK_DI, BLOCK_K]
    x = tl.load(x_ptr + row * sx_b + d * sx_d, mask=dmask, other=0.0)  # [BLOCK_DI]
    window = tl.where(k[None, :] == K - 1, x[:, None].to(old.dtype), old)
    w = tl.load(
        w_ptr + d[:, None] * sw_d + k[None, :] * sw_k,
        mask=dmask[:, None] & kmask[None, :],
        other=0.0,
    )
    acc = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)  # [BLOCK_DI] fp32
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    # The stores depend on the loads above, so this program's read-then-write is ordered.
    tl.store(state + k[None, :] * ss_k, window, mask=dmask[:, None] & kmask[None, :])
    tl.store(out_ptr + row * so_b + d * so_d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _ssm_update_kernel(
    u_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    ssm_ptr,
    slots_ptr,
    D_ptr,
    z_ptr,
    y_ptr,
    DI,
    N,
    su_b,
    su_d,
    sdt_b,
    sdt_d,
    sA_d,
    sA_n,
    sB_b,
    sB_n,
    sC_b,
    sC_n,
    ss_s,
    ss_d,
    ss_n,
    sz_b,
    sz_d,
    sy_b,
    sy_d,
    BLOCK_DI: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
):
    row = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_DI + tl.arange(0, BLOCK_DI)  # [BLOCK_DI]
    n = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    dmask = d < DI
    mask = dmask[:, None] & (n[None, :] < N)  # [BLOCK_DI, BLOCK_N]
    slot = tl.load(slots_ptr + row).to(tl.int64)
    state_p = ssm_ptr + slot * ss_s + d[:, None] * ss_d + n[None, :] * ss_n
    state = tl.load(state_p, mask=mask, other=0.0)  # [BLOCK_DI, BLOCK_N] fp32
    u = tl.load(u_ptr + row * su_b + d * su_d, mask=dmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + row * sdt_b + d * sdt_d, mask=dmask, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=mask, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + row * sB_b + n * sB_n, mask=n < N, other=0.0).to(tl.float32)  # [BLOCK_N]
    C = tl.load(C_ptr + row * sC_b + n * sC_n, mask=n < N, other=0.0).to(tl.float32)
    # Padded lanes stay zero: A=0 gives dA=1 on a zero state, and B=C=0 there.
    state = state * tl.exp(dt[:, None] * A) + dt[:, None] * B[None, :] * u[:, None]
    tl.store(state_p, state, mask=mask)
    y = tl.sum(state * C[None, :], axis=1)  # [BLOCK_DI]
    if HAS_D:
        y += u * tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row * sz_b + d * sz_d, mask=dmask, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + row * sy_b + d * sy_d, y.to(y_ptr.dtype.element_ty), mask=dmask)


def _block(di: int, block_di: int | None) -> int:
    return block_di or min(64, triton.next_power_of_2(di))


def conv_update(x, conv_state, weight, bias, slots, silu: bool = False, block_di=None):
    """Decode conv step in place: see `jamba_ray.model.kernels.conv_update`."""
    b, di = x.shape
    k = conv_state.shape[-1]
    w = weight.reshape(di, k)  # accepts nn.Conv1d's [DI, 1, K]
    out = torch.empty_like(x)  # [B, DI]
    bias = flat(bias)
    same_device(x, conv_state, w, bias, slots)
    if b == 0:
        return out
    blk = _block(di, block_di)
    _conv_update_kernel[(b, triton.cdiv(di, blk))](
        x,
        conv_state,
        w,
        bias if bias is not None else w,
        slots,
        out,
        di,
        *x.stride(),
        *conv_state.stride(),
        *w.stride(),
        *out.stride(),
        K=k,
        BLOCK_K=triton.next_power_of_2(k),
        BLOCK_DI=blk,
        HAS_BIAS=bias is not None,
        SILU=silu,
    )
    return out


def ssm_update(u, dt, A, B, C, ssm, slots, D=None, z=None, block_di=None):
    """Decode selective state update in place: see `jamba_ray.model.kernels.ssm_update`."""
    b, di = u.shape
    n = A.shape[-1]
    y = torch.empty_like(u)  # [B, DI]
    D = flat(D)
    same_device(u, ssm, dt, A, B, C, slots, D, z)
    fp32_state(ssm)
    if b == 0:
        return y
    blk = _block(di, block_di)
    zs = z.stride() if z is not None else (0, 0)
    _ssm_update_kernel[(b, triton.cdiv(di, blk))](
        u,
        dt,
        A,
        B,
        C,
        ssm,
        slots,
        D if D is not None else u,
        z if z is not None else u,
        y,
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
        BLOCK_DI=blk,
        BLOCK_N=triton.next_power_of_2(n),
        HAS_D=D is not None,
        HAS_Z=z is not None,
    )
    return y
