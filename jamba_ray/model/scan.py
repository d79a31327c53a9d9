"""Jamba's selective scan over one sequence: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t.

With S_t = dt_1 + ... + dt_t counted from a starting state h_0, the decays multiply into one
exponential: h_t = exp(A S_t) h_0 + sum_{s <= t} exp(A (S_t - S_s)) dt_s B_s u_s. Every exponent
there is <= 0 (dt >= 0, A < 0), so each factor lies in [0, 1]: these differences of cumulative sums
("segment sums") are stable, unlike exp(-A S_s) on its own, which overflows. `chunked_scan` uses them
within short segments of a chunk, carries the segments' start states through the chunk, and keeps
only one chunk's [chunk, DI, N] states alive at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens per step: [64, DI, N] fp32 states are 4 MiB at d_inner=1024, d_state=16
SEGMENT = 2  # tokens per segment: its pairwise decays cost (SEGMENT - 1) / 2 exps per token and state


def scan_reference(u, dt, A, B, C, state):
    """The plain recurrence, token by token: u, dt [n, DI]; A [DI, N]; B, C [n, N]; state [DI, N].

    Returns (y [n, DI], final state [DI, N]). Materialises [n, DI, N] tensors: for tests only."""
    dA = torch.exp(dt[:, :, None] * A)  # [n, DI, N]
    dBu = dt[:, :, None] * B[:, None, :] * u[:, :, None]  # [n, DI, N]
    states = []
    for t in range(u.shape[0]):
        state = dA[t] * state + dBu[t]  # [DI, N]
        states.append(state)
    if not states:
        return u.new_empty(u.shape), state
    return torch.matmul(torch.stack(states), C[:, :, None])[:, :, 0], state  # [n, DI]


def chunked_scan(u, dt, A, B, C, state, chunk: int = CHUNK, emit_at: Sequence[int] = ()):
    """The same scan, `chunk` tokens at a time. Shapes as `scan_reference`; `emit_at` holds token
    indices p whose states (after token p) are also returned, as [len(emit_at), DI, N]."""
    n = u.shape[0]
    if any(not 0 <= p < n for p in emit_at):
        raise ValueError(f"emit_at positions must lie in [0, {n}), got {list(emit_at)}")
    y = u.new_empty(u.shape)  # [n, DI]
    emitted = u.new_empty(len(emit_at), *state.shape)  # [E, DI, N]
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        states = chunk_states(u[lo:hi], dt[lo:hi], A, B[lo:hi], state)  # [m, DI, N]
        y[lo:hi] = torch.einsum("tdn,tn->td", states, C[lo:hi])
        for i, p in enumerate(emit_at):
            if lo <= p < hi:
                emitted[i] = states[p - lo]
        state = states[-1].clone()
    return y, state, emitted


def chunk_states(u, dt, A, B, state, segment: int = SEGMENT):
    """All m states of a chunk from its start state [DI, N]: [m, DI, N]."""
    m = u.shape[0]
    pad = -m % segment  # padding tokens have dt = 0: decay 1, input 0, so they keep the state
    u, dt, B = (F.pad(x, (0, 0, 0, pad)) for x in (u, dt, B))
    g = dt.shape[0] // segment
    dt = dt.view(g, segment, -1)  # [G, W, DI]
    cum = dt.cumsum(1)  # [G, W, DI]: S_t from each segment's start
    inputs = (dt * u.view(dt.shape))[..., None] * B.view(g, segment, 1, -1)  # [G, W, DI, N]
    local = _segment_scan(inputs, cum, A)  # [G, W, DI, N] from zero start states
    decay = torch.exp_(cum[..., None] * A)  # [G, W, DI, N]: exp(A S_t), the start state's decay
    starts = _carry(local[:, -1], decay[:, -1], state)  # [G, DI, N]
    return local.addcmul_(decay, starts[:, None]).flatten(0, 1)[:m]


def _segment_scan(inputs, cum, A):
    """States of each segment from a zero start: sum_{s <= t} exp(A (S_t - S_s)) inputs_s.

    Only the pairs s < t get an exponential (the diagonal's decay is 1): the mask is an index."""
    t, s = torch.tril_indices(cum.shape[1], cum.shape[1], -1, device=cum.device)  # [P] each
    pairs = torch.exp_((cum[:, t] - cum[:, s])[..., None] * A)  # [G, P, DI, N], all in [0, 1]
    return inputs.index_add_(1, t, pairs.mul_(inputs[:, s]))  # [G, W, DI, N]


def _carry(ends, decays, state):
    """Start state of each segment [G, DI, N]: h_g = decays[g-1] * h_{g-1} + ends[g-1], h_0 = state.

    One fused multiply-add per segment; every other step of the scan works on whole chunks."""
    starts = ends.new_empty(ends.shape[0] + 1, *state.shape)  # [G + 1, DI, N]
    starts[0] = state
    for g in range(ends.shape[0]):
        torch.addcmul(ends[g], decays[g], starts[g], out=starts[g + 1])
    return starts[:-1]
