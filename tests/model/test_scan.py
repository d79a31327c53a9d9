"""The chunked selective scan computes the reference recurrence, chunk by chunk, in bounded memory.

Tolerance: both paths work in fp32 but round differently (the chunked scan exponentiates sums of
dt where the reference multiplies per-token decays, and it adds the inputs in another order), so
outputs agree to about 1e-6 at these magnitudes, not bit for bit; 1e-5 absolute leaves room.
"""

import pytest
import torch

from jamba_ray.model.mamba import ssm_scan
from jamba_ray.model.scan import chunk_states, chunked_scan, scan_reference

DI, N = 24, 8
L = 8  # chunk used in these tests (odd lengths around it exercise the partial last chunk)
ATOL = 1e-5


def inputs(n, seed=0, dt_scale=1.0, state_scale=0.0):
    """u, dt [n, DI]; A [DI, N] < 0; B, C [n, N]; state [DI, N] at the model's magnitudes."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, DI, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(n, DI, generator=g) - 2) * dt_scale
    A = -torch.linspace(1, N, N).repeat(DI, 1) * torch.rand(DI, 1, generator=g).add(0.5)
    B = torch.randn(n, N, generator=g)
    C = torch.randn(n, N, generator=g)
    state = torch.randn(DI, N, generator=g) * state_scale
    return u, dt, A, B, C, state


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [1, 2, L - 1, L, L + 1, 3 * L + 5, 301])
def test_outputs_and_final_state_match_the_reference(n):
    u, dt, A, B, C, state = inputs(n)
    y, final, _ = chunked_scan(u, dt, A, B, C, state, chunk=L)
    y_ref, final_ref = scan_reference(u, dt, A, B, C, state)
    close(y, y_ref)
    close(final, final_ref)


def test_a_nonzero_initial_state_is_decayed_into_the_outputs():
    u, dt, A, B, C, state = inputs(3 * L + 5, state_scale=2.0)
    y, final, _ = chunked_scan(u, dt, A, B, C, state, chunk=L)
    y_ref, final_ref = scan_reference(u, dt, A, B, C, state)
    close(y, y_ref)
    close(final, final_ref)
    assert (y - chunked_scan(u, dt, A, B, C, torch.zeros_like(state), chunk=L)[0]).abs().max() > 0.1


def test_emitted_states_are_the_states_after_those_tokens():
    n = 3 * L + 5
    u, dt, A, B, C, state = inputs(n, state_scale=1.0)
    at = (0, L - 1, L, L + 1, 2 * L, n - 1, L)  # chunk edges, the last token, a repeat
    _, _, emitted = chunked_scan(u, dt, A, B, C, state, chunk=L, emit_at=at)
    assert emitted.shape == (len(at), DI, N)
    for i, p in enumerate(at):
        prefix = slice(0, p + 1)
        close(emitted[i], scan_reference(u[prefix], dt[prefix], A, B[prefix], C[prefix], state)[1])


def test_no_positions_emit_an_empty_stack():
    u, dt, A, B, C, state = inputs(5)
    assert chunked_scan(u, dt, A, B, C, state, chunk=L)[2].shape == (0, DI, N)


def test_positions_outside_the_sequence_are_rejected():
    u, dt, A, B, C, state = inputs(5)
    with pytest.raises(ValueError, match="emit_at"):
        chunked_scan(u, dt, A, B, C, state, emit_at=(5,))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_the_chunk_size_does_not_change_the_result(chunk):
    u, dt, A, B, C, state = inputs(50, state_scale=1.0)
    y, final, emitted = chunked_scan(u, dt, A, B, C, state, chunk=chunk, emit_at=(6, 20))
    y_ref, final_ref, emitted_ref = chunked_scan(u, dt, A, B, C, state, chunk=L, emit_at=(6, 20))
    close(y, y_ref)
    close(final, final_ref)
    close(emitted, emitted_ref)


def test_scanning_in_two_calls_equals_one_call():
    """Chunked prefill: the second part continues from the first part's final state."""
    u, dt, A, B, C, state = inputs(40)
    y, final, _ = chunked_scan(u, dt, A, B, C, state, chunk=L)
    y1, mid, _ = chunked_scan(u[:13], dt[:13], A, B[:13], C[:13], state, chunk=L)
    y2, end, _ = chunked_scan(u[13:], dt[13:], A, B[13:], C[13:], mid, chunk=L)
    close(torch.cat([y1, y2]), y)
    close(end, final)


def test_an_empty_sequence_keeps_the_state():
    _, _, A, _, _, state = inputs(0, state_scale=1.0)
    u = torch.empty(0, DI)
    y, final, _ = chunked_scan(u, u, A, torch.empty(0, N), torch.empty(0, N), state)
    assert y.shape == (0, DI)
    close(final, state)


def test_decays_that_underflow_to_zero_stay_finite():
    """dt up to ~300: exp(A * dt) and every segment sum's exp underflow to 0 (no inf, no NaN)."""
    u, dt, A, B, C, state = inputs(3 * L + 5, dt_scale=100.0, state_scale=1.0)
    assert torch.exp(dt.max() * A).min() == 0
    y, final, emitted = chunked_scan(u, dt, A, B, C, state, chunk=L, emit_at=(L,))
    assert torch.isfinite(y).all() and torch.isfinite(final).all() and torch.isfinite(emitted).all()
    y_ref, final_ref = scan_reference(u, dt, A, B, C, state)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=1e-6)  # y ~ dt: large, relative check
    torch.testing.assert_close(final, final_ref, atol=ATOL, rtol=1e-6)


def test_no_tensor_grows_with_the_sequence_beyond_n_by_d_inner():
    """Memory is bounded by the chunk: [n, DI]-sized tensors (y, per-token dt sums) and a few
    [chunk, DI, N] ones, never an [n, DI, N] tensor (the reference allocates several)."""
    n, chunk = 1024, 16
    u, dt, A, B, C, state = inputs(n)
    full = n * DI * N * 4  # bytes of one [n, DI, N] fp32 tensor

    def largest_allocation(fn):
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            fn()
        return max(e.cpu_memory_usage for e in prof.events())

    assert largest_allocation(lambda: scan_reference(u, dt, A, B, C, state)) >= full
    bound = max(2 * n * DI * 4, 4 * chunk * DI * N * 4)  # N = 8: a quarter of `full`
    assert largest_allocation(lambda: chunked_scan(u, dt, A, B, C, state, chunk=chunk)) <= bound


def test_ssm_scan_reads_and_writes_back_only_its_slot():
    u, dt, A, B, C, state = inputs(19, state_scale=1.0)
    ssm = torch.randn(3, DI, N, generator=torch.Generator().manual_seed(7))
    ssm[1] = state
    before = ssm.clone()
    y = ssm_scan(u, dt, A, B, C, ssm, 1)
    y_ref, final_ref = scan_reference(u, dt, A, B, C, state)
    close(y, y_ref)
    close(ssm[1], final_ref)
    assert torch.equal(ssm[0], before[0]) and torch.equal(ssm[2], before[2])


@pytest.mark.parametrize("segment", [1, 3, 4])
def test_other_segment_widths_give_the_same_states(segment):
    """Wider segments take more pairwise decays per token; the states stay the same."""
    u, dt, A, B, C, state = inputs(3 * L + 5, state_scale=1.0)
    parts = chunk_states(u, dt, A, B, state, chunk=L, segment=segment)
    states = torch.cat([s for _, s in parts])[: len(u)]  # [n, DI, N]
    y_ref, final_ref = scan_reference(u, dt, A, B, C, state)
    close((states * C[:, None, :]).sum(-1), y_ref)
    close(states[-1], final_ref)


@pytest.mark.parametrize("n", [1, 3, 17])
def test_the_conv_as_shifted_multiply_adds_equals_the_grouped_conv1d(n):
    """Same products, summed in another order: fp32 agreement to ~1e-6, 1e-5 leaves room. The
    slot's conv state (its last K inputs) comes out the same, bit for bit (a copy)."""
    from jamba_ray.model.mamba import conv_chunk, conv_chunk_reference

    g = torch.Generator().manual_seed(3)
    xs = torch.randn(n, 2 * DI, generator=g)[:, :DI]  # a strided view, as in_proj's chunk is
    weight, bias = torch.randn(DI, 1, 4, generator=g), torch.randn(DI, generator=g)
    conv = torch.randn(2, DI, 4, generator=g)
    ref_conv = conv.clone()
    out = conv_chunk(xs, conv, 1, weight, bias)
    close(out, conv_chunk_reference(xs, ref_conv, 1, weight, bias))
    torch.testing.assert_close(conv, ref_conv, atol=0, rtol=0)


def test_the_conv_in_bf16_sums_in_fp32_like_the_grouped_conv1d():
    """bf16 inputs: both round the same fp32 sums once to bf16, so they agree to one bf16 ulp
    (2**-7 relative) at most."""
    from jamba_ray.model.mamba import conv_chunk, conv_chunk_reference

    g = torch.Generator().manual_seed(4)
    xs = torch.randn(9, DI, generator=g).bfloat16()
    weight = torch.randn(DI, 1, 4, generator=g).bfloat16()
    bias = torch.randn(DI, generator=g).bfloat16()
    conv = torch.randn(1, DI, 4, generator=g).bfloat16()
    out = conv_chunk(xs, conv.clone(), 0, weight, bias)
    want = conv_chunk_reference(xs.float(), conv.float(), 0, weight.float(), bias.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=2**-7, atol=1e-6)
