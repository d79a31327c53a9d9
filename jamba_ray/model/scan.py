"""Jamba's selective scan of one sequence: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t.

With S_t = dt_1 + ... + dt_t counted from a start state h_0, the decays multiply into one
exponential: h_t = exp(A S_t) h_0 + sum_{s <= t} exp(A (S_t - S_s)) dt_s B_s u_s. Every exponent
there is <= 0 (dt >= 0, A < 0), so every factor lies in [0, 1]: these differences of cumulative
sums ("segment sums") are stable, unlike exp(-A S_s) alone, which overflows. `chunked_scan` applies
them within short segments, carries the segments' start states through each chunk, and keeps one
chunk's [chunk, DI, N] states alive at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens per step: [64, DI, N] fp32 is 4 MiB at DI=1024, N=16; the step holds ~6 of them
SEGMENT = 2  # tokens per segment: costs 1 + (SEGMENT - 1) / 2 exps per token and (d, n)


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
    """The same scan, about `chunk` tokens at a time (whole segments). Shapes as `scan_reference`;
    returns (y [n, DI], final state [DI, N], the states after tokens `emit_at` [E, DI, N])."""
    n = u.shape[0]
    if any(not 0 <= p < n for p in emit_at):
        raise ValueError(f"emit_at positions must lie in [0, {n}), got {list(emit_at)}")
    y = u.new_empty(u.shape)  # [n, DI]
    emitted = u.new_empty(len(emit_at), *state.shape)  # [E, DI, N]
    for lo, states in chunk_states(u, dt, A, B, state, chunk):  # states [m, DI, N]
        hi = min(lo + states.shape[0], n)  # the last chunk may end in padding
        torch.bmm(states[: hi - lo], C[lo:hi, :, None], out=y[lo:hi, :, None])  # [m, DI, 1]
        for i, p in enumerate(emit_at):
            if lo <= p < hi:
                emitted[i] = states[p - lo]
        state = states[-1]  # padding keeps the state: this is the one after token hi - 1
    return y, state.clone(), emitted


def chunk_states(u, dt, A, B, state, chunk: int = CHUNK, segment: int = SEGMENT):
    """Yield (first token, states [m, DI, N]) chunk by chunk, each chunk from the previous one's
    last state; the tokens are padded to whole segments with dt = 0 (decay 1, input 0)."""
    pad = -u.shape[0] % segment
    dtu, dt, B = (F.pad(x, (0, 0, 0, pad)) if pad else x for x in (dt * u, dt, B))
    g, di = dt.shape[0] // segment, dt.shape[1]
    exponents = _segment_sums(dt.reshape(g, segment, di))  # [S, W + P, DI], all >= 0
    dtu, B = dtu.reshape(g, segment, di), B.reshape(g, segment, 1, B.shape[1])
    step = max(1, chunk // segment)  # segments per chunk
    for a in range(0, g, step):
        c = slice(a, a + step)
        states = _chunk(dtu[c], B[c], exponents[c], A, state)  # [G * W, DI, N]
        yield a * segment, states
        state = states[-1]


def _segment_sums(dt):
    """dt [S, W, DI] -> [S, W + P, DI]: S_t from each segment's start (t < W), then the sums
    S_t - S_{t-k} over the pairs inside a segment, diagonal by diagonal (k = 1 .. W - 1)."""
    s, w, di = dt.shape
    out = dt.new_empty(s, w + w * (w - 1) // 2, di)  # filled in place: no concatenation
    cum = torch.cumsum(dt, 1, out=out[:, :w])  # [S, W, DI]
    at = w
    for k in range(1, w):
        torch.sub(cum[:, k:], cum[:, : w - k], out=out[:, at : at + w - k])
        at += w - k
    return out


def _chunk(dtu, B, exponents, A, state):
    """States [G * W, DI, N] of G segments of W tokens, from the chunk's start state [DI, N].

    Within a segment: h_t = exp(A S_t) h_start + sum_{s <= t} exp(A (S_t - S_s)) dt_s B_s u_s."""
    w = dtu.shape[1]
    inputs = dtu[..., None] * B  # [G, W, DI, N]: dt_s B_s u_s
    decays = torch.exp_(exponents[..., None] * A)  # [G, W + P, DI, N], all in [0, 1]
    start_decay, pairs = decays[:, :w], decays[:, w:]  # exp(A S_t); exp(A (S_t - S_s)), s < t
    # From a zero start state: each input itself (its own decay is exp(0) = 1), then diagonal k
    # adds input t - k to state t. Past W = 2 a diagonal reads rows an earlier one updated.
    local = inputs.clone() if w > 2 else inputs  # [G, W, DI, N]
    for k in range(1, w):
        local[:, k:].addcmul_(pairs[:, : w - k], inputs[:, : w - k])
        pairs = pairs[:, w - k :]
    starts = _carry(local[:, -1], start_decay[:, -1], state)  # [G, DI, N]
    return local.addcmul_(start_decay, starts[:, None]).flatten(0, 1)


def _carry(ends, decays, state):
    """Start state of each segment [G, DI, N]: h_g = decays[g-1] * h_{g-1} + ends[g-1], h_0 = state.

    One fused multiply-add per segment; every other step of the scan works on whole chunks."""
    starts = ends.new_empty(ends.shape[0] + 1, *state.shape)  # [G + 1, DI, N]
    starts[0] = state
    for g in range(ends.shape[0]):
        torch.addcmul(ends[g], decays[g], starts[g], out=starts[g + 1])
    return starts[:-1]
