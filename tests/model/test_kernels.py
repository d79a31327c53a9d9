"""Triton Mamba kernels vs their torch references (under TRITON_INTERPRET=1 on CPU tensors).

Tolerances: fp32 results differ from the reference only by summation order and the exp
implementation (numpy's or the GPU's vs torch's), a few fp32 ulps on values of magnitude ~10, so
1e-5 abs + 1e-5 rel. bf16 outputs: both paths compute in fp32 and round once, so they can land one
bf16 ulp apart (2^-7 relative) when the fp32 values straddle a rounding boundary: 1e-2 rel.
The SSM state is fp32 on both paths even with bf16 inputs, so it keeps the fp32 bound.
"""

import pytest
import torch

from tests.conftest import need_triton  # noqa: E402

need_triton()  # skips, or fails in CI, before the kernels are imported

from jamba_ray.model import kernels  # noqa: E402
from jamba_ray.model.kernels import decode, scan  # noqa: E402
from jamba_ray.model.kernels.reference import (  # noqa: E402
    conv_update_ref,
    scan_ref,
    ssm_update_ref,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
POOL = 7
SLOTS = [5, 1, 3]  # non-consecutive, unsorted; slots 0, 2, 4, 6 must stay untouched
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1e-2)}


def rand(*shape, dtype=torch.float32, gen):
    return torch.randn(*shape, generator=gen).to(DEV, dtype)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL[expected.dtype])


def assert_untouched(pool, before, slots):
    others = [s for s in range(pool.shape[0]) if s not in slots]
    assert torch.equal(pool[others], before[others])  # same memory, never written


def ssm_inputs(rows, di, n, dtype, gen):
    """u, dt, A, B, C, D, z as mamba.py builds them: dt softplus'ed fp32, A = -exp(A_log)."""
    u, z = rand(rows, di, dtype=dtype, gen=gen), rand(rows, di, dtype=dtype, gen=gen)
    dt = torch.nn.functional.softplus(rand(rows, di, gen=gen))  # [rows, DI] fp32
    A = -torch.arange(1, n + 1, dtype=torch.float32, device=DEV).expand(di, n).contiguous()
    A = A * (0.5 + torch.rand(di, n, generator=gen).to(DEV))  # vary per channel
    B, C = rand(rows, n, dtype=dtype, gen=gen), rand(rows, n, dtype=dtype, gen=gen)
    return u, dt, A, B, C, rand(di, dtype=dtype, gen=gen), z


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias,silu", [(True, True), (False, False)])
def test_conv_update_matches_reference(dtype, with_bias, silu):
    gen = torch.Generator().manual_seed(0)
    di, k = 40, 4  # DI not a multiple of the 16-channel block
    x = rand(len(SLOTS), di, dtype=dtype, gen=gen)  # [B, DI]
    state = rand(POOL, di, k, dtype=dtype, gen=gen)  # [S, DI, K]
    weight = rand(di, 1, k, dtype=dtype, gen=gen)  # nn.Conv1d layout
    bias = rand(di, dtype=dtype, gen=gen) if with_bias else None
    slots = torch.tensor(SLOTS, device=DEV)
    before, ref_state = state.clone(), state.clone()
    out = decode.conv_update(x, state, weight, bias, slots, silu=silu, block_di=16)
    expected = conv_update_ref(x, ref_state, weight, bias, slots, silu=silu)
    assert out.dtype == dtype
    close(out, expected)
    close(state, ref_state)
    assert_untouched(state, before, SLOTS)
    close(state[SLOTS, :, -1], x)  # the new input sits at the end of each window


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,gated", [(16, True), (8, False)])
def test_ssm_update_matches_reference(dtype, n, gated):
    gen = torch.Generator().manual_seed(1)
    di = 72  # two full 32-channel blocks and a partial one
    u, dt, A, B, C, D, z = ssm_inputs(len(SLOTS), di, n, dtype, gen)
    D, z = (D, z) if gated else (None, None)
    ssm = rand(POOL, di, n, gen=gen)  # [S, DI, N] fp32
    slots = torch.tensor(SLOTS, device=DEV)
    before, ref_ssm = ssm.clone(), ssm.clone()
    y = decode.ssm_update(u, dt, A, B, C, ssm, slots, D=D, z=z, block_di=32)
    expected = ssm_update_ref(u, dt, A, B, C, ref_ssm, slots, D=D, z=z)
    assert y.dtype == dtype
    close(y, expected)
    close(ssm, ref_ssm)
    assert_untouched(ssm, before, SLOTS)


def scan_case(dtype, lengths, slots, n=16, di=40, seed=2):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEV)  # [G+1]
    u, dt, A, B, C, D, z = ssm_inputs(int(cu[-1]), di, n, dtype, gen)
    ssm = rand(POOL, di, n, gen=gen)  # non-zero: every segment continues an earlier chunk
    return (u, dt, A, B, C, ssm, cu, torch.tensor(slots, device=DEV)), dict(D=D, z=z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_scan_matches_reference(dtype):
    slots = [5, 1, 6, 3]
    args, kw = scan_case(dtype, [1, 7, 0, 13], slots)  # an empty segment keeps its state
    emit = [(1, 6), (0, 0), (3, 4), (3, 12), (1, 2)]  # unordered; last token of segments 0, 1
    ssm = args[5]
    before, ref_ssm = ssm.clone(), ssm.clone()
    y, emitted = scan.varlen_scan(*args, **kw, emit=emit, block_di=16)
    y_ref, emitted_ref = scan_ref(*args[:5], ref_ssm, *args[6:], **kw, emit=emit)
    assert y.dtype == dtype and emitted.shape == (5, 40, 16)
    close(y, y_ref)
    close(emitted, emitted_ref)
    close(ssm, ref_ssm)
    assert_untouched(ssm, before, slots)
    assert torch.equal(ssm[6], before[6])  # the empty segment's slot: read and written back
    close(emitted[0], ssm[1])  # emitting a segment's last token gives its final state


def test_scan_in_chunks_equals_one_pass():
    (u, dt, A, B, C, ssm, _, slots), kw = scan_case(torch.float32, [9], [4])
    whole = ssm.clone()
    y_whole, _ = scan.varlen_scan(
        u, dt, A, B, C, whole, torch.tensor([0, 9], device=DEV), slots, **kw
    )
    parts = []
    for lo, hi in [(0, 4), (4, 9)]:  # the second chunk starts from the first one's state
        s = slice(lo, hi)
        cu = torch.tensor([0, hi - lo], device=DEV)
        kw_s = dict(D=kw["D"], z=kw["z"][s])
        parts.append(scan.varlen_scan(u[s], dt[s], A, B[s], C[s], ssm, cu, slots, **kw_s)[0])
    close(torch.cat(parts), y_whole)
    close(ssm, whole)


def test_scan_step_equals_decode_update():
    # A one-token segment and a decode step are the same recurrence.
    (u, dt, A, B, C, ssm, cu, slots), kw = scan_case(torch.float32, [1, 1, 1], SLOTS)
    dec = ssm.clone()
    y_scan, _ = scan.varlen_scan(u, dt, A, B, C, ssm, cu, slots, **kw)
    y_dec = decode.ssm_update(u, dt, A, B, C, dec, slots, **kw)
    close(y_scan, y_dec)
    close(ssm, dec)


@pytest.mark.skipif(DEV == "cuda", reason="checked only for CPU tensors (no device sync)")
def test_bad_arguments_are_refused():
    args, kw = scan_case(torch.float32, [3, 2], [0, 1])
    for bad in ([(0, 3)], [(2, 0)], [(1, -1)], [(0, 1), (0, 1)]):
        with pytest.raises(ValueError, match="emit"):
            scan.varlen_scan(*args, **kw, emit=bad)
    u, dt, A, B, C, ssm, cu, slots = args
    with pytest.raises(ValueError, match="cu_seqlens"):
        scan.varlen_scan(u, dt, A, B, C, ssm, cu[:2], slots)
    with pytest.raises(ValueError, match="fp32"):
        scan.varlen_scan(u, dt, A, B, C, ssm.bfloat16(), cu, slots)
    with pytest.raises(ValueError, match="fp32"):
        decode.ssm_update(u[:2], dt[:2], A, B[:2], C[:2], ssm.bfloat16(), slots)


def test_empty_batches_leave_state_alone():
    gen = torch.Generator().manual_seed(3)
    u, dt, A, B, C, D, z = ssm_inputs(0, 40, 8, torch.float32, gen)
    ssm = rand(POOL, 40, 8, gen=gen)
    before = ssm.clone()
    none = torch.zeros(0, dtype=torch.long, device=DEV)
    assert decode.ssm_update(u, dt, A, B, C, ssm, none, D=D, z=z).shape == (0, 40)
    y, emitted = scan.varlen_scan(
        u, dt, A, B, C, ssm, torch.zeros(1, dtype=torch.long, device=DEV), none
    )
    assert y.shape == (0, 40) and emitted.shape == (0, 40, 8)
    assert torch.equal(ssm, before)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_wrappers_agree_either_way(monkeypatch, use_kernel):
    if not use_kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)  # forces the torch fallback
    args, kw = scan_case(torch.float32, [2, 5], [2, 0])
    ref_ssm = args[5].clone()
    y, emitted = kernels.varlen_scan(*args, **kw, emit=[(1, 1)])
    y_ref, emitted_ref = scan_ref(*args[:5], ref_ssm, *args[6:], **kw, emit=[(1, 1)])
    close(y, y_ref)
    close(emitted, emitted_ref)
    close(args[5], ref_ssm)
    gen = torch.Generator().manual_seed(4)
    x, state = rand(2, 40, gen=gen), rand(POOL, 40, 4, gen=gen)
    w, slots, ref_state = rand(40, 4, gen=gen), torch.tensor([6, 2], device=DEV), state.clone()
    close(
        kernels.conv_update(x, state, w, None, slots, silu=True),
        conv_update_ref(x, ref_state, w, None, slots, silu=True),
    )
    u, dt, A, B, C, D, z = ssm_inputs(2, 40, 16, torch.float32, gen)
    ssm = rand(POOL, 40, 16, gen=gen)
    ref_ssm = ssm.clone()
    close(
        kernels.ssm_update(u, dt, A, B, C, ssm, slots, D, z),
        ssm_update_ref(u, dt, A, B, C, ref_ssm, slots, D, z),
    )
    close(ssm, ref_ssm)


def test_matches_mamba_torch_path():
    """The kernels compute what mamba.py's torch decode step and chunk scan compute (fp32)."""
    from jamba_ray.model import mamba
    from jamba_ray.model.layout import Layout

    gen = torch.Generator().manual_seed(5)
    slots = torch.tensor(SLOTS, device=DEV)
    table = torch.zeros(len(slots), 1, dtype=torch.long)  # (the Mamba path reads no KV)
    lay = Layout.fixed_decode(slots, torch.zeros_like(slots), table, table[:, 0], block_size=16)
    x, conv = rand(3, 40, gen=gen), rand(POOL, 40, 4, gen=gen)
    w, bias, conv_t = rand(40, 1, 4, gen=gen), rand(40, gen=gen), conv.clone()
    close(decode.conv_update(x, conv, w, bias, slots), mamba.conv_step(x, conv_t, lay, w, bias))
    close(conv, conv_t)
    u, dt, A, B, C, _, _ = ssm_inputs(3, 40, 16, torch.float32, gen)
    ssm = rand(POOL, 40, 16, gen=gen)
    ssm_t = ssm.clone()
    close(decode.ssm_update(u, dt, A, B, C, ssm, slots), mamba.ssm_step(u, dt, A, B, C, ssm_t, lay))
    close(ssm, ssm_t)
    (u, dt, A, B, C, ssm, cu, seg_slots), _ = scan_case(torch.float32, [4, 6], [0, 2])
    ssm_t = ssm.clone()
    y, _ = scan.varlen_scan(u, dt, A, B, C, ssm, cu, seg_slots)
    for g, slot in enumerate([0, 2]):
        s = slice(int(cu[g]), int(cu[g + 1]))
        close(y[s], mamba.ssm_scan(u[s], dt[s], A, B[s], C[s], ssm_t, slot))
    close(ssm, ssm_t)
