"""Small, deterministic inputs for each op's self-check (`selfcheck.checked`), and how to run an
implementation of the op on them. Shapes are odd on purpose: channels not a multiple of the
kernels' blocks, slots neither sorted nor consecutive, rows spanning several KV blocks.

Each `run_*(impl, inputs)` returns what is compared: the op's outputs and the states it updates in
place (so a kernel that writes the wrong slot fails, not just one that computes a wrong value).
"""

from __future__ import annotations

import functools

import torch

from . import selfcheck

DI, N, K, S = 40, 8, 4, 5  # channels, state size, conv width, slots
NH, KVH, HD = 4, 2, 16  # query heads, kv heads, head dim
PAGED_BLOCK = {"flash_attn_with_kvcache": 256}  # FlashAttention-2's paged KV needs 256-blocks


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def conv_inputs(device, dtype):
    g = torch.Generator().manual_seed(1)
    slots = torch.tensor([3, 0, 4])
    x, state = _randn(g, 3, DI, dtype=dtype), _randn(g, S, DI, K, dtype=dtype)
    w, b = _randn(g, DI, 1, K, dtype=dtype) * 0.5, _randn(g, DI, dtype=dtype)
    return [t.to(device) for t in (x, state, w, b, slots)]


def run_conv(impl, a):
    x, state, w, b, slots = a
    return impl(x, state, w, b, slots, silu=True), state


def ssm_inputs(device, dtype):
    g = torch.Generator().manual_seed(2)
    slots = torch.tensor([4, 1, 2])
    u = _randn(g, 3, DI, dtype=dtype)
    dt = torch.nn.functional.softplus(_randn(g, 3, DI))  # [B, DI] fp32, > 0
    A = -torch.exp(_randn(g, DI, N) * 0.5)  # [DI, N] < 0
    B, C, ssm = _randn(g, 3, N), _randn(g, 3, N), _randn(g, S, DI, N)
    return [t.to(device) for t in (u, dt, A, B, C, ssm, slots)]


def run_ssm(impl, a):
    u, dt, A, B, C, ssm, slots = a
    return impl(u, dt, A, B, C, ssm, slots), ssm


def scan_inputs(device, dtype):
    g = torch.Generator().manual_seed(3)
    t = 9
    u = _randn(g, t, DI, dtype=dtype)
    dt = torch.nn.functional.softplus(_randn(g, t, DI))
    A = -torch.exp(_randn(g, DI, N) * 0.5)
    B, C, ssm = _randn(g, t, N), _randn(g, t, N), _randn(g, S, DI, N)
    cu, slots = torch.tensor([0, 4, 9]), torch.tensor([2, 0])  # segments of 4 and 5 tokens
    return [x.to(device) for x in (u, dt, A, B, C, ssm, cu, slots)]


def run_scan(impl, a):
    u, dt, A, B, C, ssm, cu, slots = a
    y, emitted = impl(u, dt, A, B, C, ssm, cu, slots, emit=[(0, 1), (1, 4)])
    return y, emitted, ssm


def paged_inputs(device, dtype, bs: int):
    g = torch.Generator().manual_seed(4)
    lengths = [1, bs + 3, 2 * bs]  # within one block, into a second one, two full blocks
    nblk = 6
    k, v = _randn(g, nblk, KVH, bs, HD, dtype=dtype), _randn(g, nblk, KVH, bs, HD, dtype=dtype)
    q = _randn(g, len(lengths), NH, HD, dtype=dtype)
    table = torch.tensor([[5, 0], [2, 4], [1, 3]])  # [B, 2], row 0's second entry unread
    return [x.to(device) for x in (q, k, v, table, torch.tensor(lengths))]


def run_paged(impl, a):
    q, k, v, table, lens = a
    return impl(q, k, v, table, lens, HD**-0.5)


def prefill_inputs(device, dtype):
    g = torch.Generator().manual_seed(5)
    cu_q, cu_k = torch.tensor([0, 5, 8]), torch.tensor([0, 5, 12])  # a fresh 5, a 3 after 4
    q = _randn(g, 8, NH, HD, dtype=dtype)
    k, v = _randn(g, 12, KVH, HD, dtype=dtype), _randn(g, 12, KVH, HD, dtype=dtype)
    return [x.to(device) for x in (q, k, v, cu_q, cu_k)]


def run_prefill(impl, a):
    q, k, v, cu_q, cu_k = a
    return impl(q, k, v, cu_q, cu_k, 5, 7, HD**-0.5)


# op -> (make_inputs(device, dtype), run(impl, inputs))
PROBES = {
    "conv_update": (conv_inputs, run_conv),
    "ssm_update": (ssm_inputs, run_ssm),
    "varlen_scan": (scan_inputs, run_scan),
    "paged_decode": (None, run_paged),
    "prefill": (prefill_inputs, run_prefill),
}


def check(op: str, name: str, impl, reference, device, dtype) -> bool:
    """Self-check implementation `impl` (kernel `name`) of `op` against `reference`, once per
    (device, dtype)."""
    make, run = PROBES[op]
    if op == "paged_decode":
        make = functools.partial(paged_inputs, bs=PAGED_BLOCK.get(name, 4))
    return selfcheck.checked(
        name,
        functools.partial(run, impl),
        functools.partial(run, reference),
        make,
        device=device,
        dtype=dtype,
    )
