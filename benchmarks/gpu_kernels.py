"""Per-kernel time and achieved memory bandwidth at Jamba-v0.1 shapes, beside the torch path each
kernel replaces: paged decode attention, the Mamba conv/SSM decode updates, the varlen scan, MoE.

Bytes are what a kernel must move at least (each input read once, each output written once); for
MoE, the weights of the experts the batch hits. On the CPU (--cpu-smoke) the Triton kernels run
under the interpreter on tiny shapes: those times test the script, they are not measurements.
"""

from __future__ import annotations

import torch

from benchmarks.gpu_util import empty_cache, guarded, rate, timed
from jamba_ray.model import kernels
from jamba_ray.model.kernels import reference

JAMBA = dict(h=4096, di=8192, n=16, k=4, nh=32, kvh=8, hd=128, bs=16, e=16, top_k=2, inter=14336)
SMOKE = dict(h=64, di=64, n=8, k=4, nh=4, kvh=2, hd=16, bs=4, e=4, top_k=2, inter=96)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def kernel_checks(dev: str, smoke: bool) -> dict:
    if not kernels.available():
        return {"skipped": "Triton cannot run here (no CUDA device, TRITON_INTERPRET unset)"}
    s = SMOKE if smoke else JAMBA
    iters, warmup = (1, 0) if smoke else (50, 5)
    out = {"interpreted": dev != "cuda", "shapes": s}
    for name, fn in (
        ("paged_attention", paged_attention),
        ("conv_update", conv_update),
        ("ssm_update", ssm_update),
        ("varlen_scan", varlen_scan),
        ("moe", moe),
    ):
        out[name] = guarded(fn, s, dev, smoke, iters, warmup)
        empty_cache(dev)
    return out


def _pool_tables(lengths: list[int], bs: int, dev: str, gen):
    """Tables [B, NB] over shuffled blocks (the last one the padding), and the pool size."""
    own = [-(-n // bs) for n in lengths]
    nblk = sum(own) + 1
    ids = torch.randperm(nblk - 1, generator=gen).tolist()
    rows, at = [], 0
    for nb in own:
        rows.append(ids[at : at + nb] + [nblk - 1] * (max(own) - nb))
        at += nb
    return torch.tensor(rows, dtype=torch.int32, device=dev), nblk


def paged_attention(s, dev, smoke, iters, warmup) -> dict:
    gen = torch.Generator().manual_seed(0)
    cases = (
        {"b1_ctx32k": [32768], "b64_ctx2k": [2048] * 64, "b256_ctx2k": [2048] * 256}
        if not smoke
        else {"b1_ctx9": [9], "b3_mixed": [1, 4, 14]}
    )
    if not smoke:  # rows of mixed length: the kernel reads each row's own, the padded path all
        cases["b64_mixed_1_to_4k"] = torch.randint(1, 4097, (64,), generator=gen).tolist()
    res = {}
    for name, lengths in cases.items():
        res[name] = guarded(_paged_case, s, dev, lengths, gen, iters, warmup)
        empty_cache(dev)
    return res


def _paged_case(s, dev, lengths, gen, iters, warmup) -> dict:
    from jamba_ray.model.attention import decode_padded
    from jamba_ray.model.kernels.paged_attention import paged_decode
    from jamba_ray.model.layout import Layout

    table, nblk = _pool_tables(lengths, s["bs"], dev, gen)
    shape = (nblk, s["kvh"], s["bs"], s["hd"])
    k = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    v = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    q = torch.randn(len(lengths), s["nh"], s["hd"], device=dev, dtype=torch.bfloat16)
    lens = torch.tensor(lengths, device=dev)
    scale = s["hd"] ** -0.5
    moved = sum(lengths) * 2 * s["kvh"] * s["hd"] * 2 + 2 * nbytes(q)
    t = timed(lambda: paged_decode(q, k, v, table, lens, scale), dev, iters, warmup)
    lay = Layout.fixed_decode(lens * 0, lens - 1, table.long(), table[:, 0].long(), s["bs"])
    attn = type("Attn", (), {"scaling": scale})()
    t_ref = timed(lambda: decode_padded(attn, q, lay, k, v), dev, iters, warmup)
    return {
        "rows": len(lengths),
        "keys": sum(lengths),
        **rate(moved, t),
        "torch_padded_ms": t_ref * 1e3,  # gather of the padded tables + masked SDPA
    }


def conv_update(s, dev, smoke, iters, warmup) -> dict:
    return {f"b{b}": _conv_case(s, dev, b, iters, warmup) for b in _decode_batches(smoke)}


def _conv_case(s, dev, b, iters, warmup) -> dict:
    from jamba_ray.model.kernels.decode import conv_update as kernel

    state = torch.randn(b + 1, s["di"], s["k"], device=dev, dtype=torch.bfloat16)
    x = torch.randn(b, s["di"], device=dev, dtype=torch.bfloat16)
    w = torch.randn(s["di"], 1, s["k"], device=dev, dtype=torch.bfloat16)
    bias = torch.randn(s["di"], device=dev, dtype=torch.bfloat16)
    slots = torch.randperm(b + 1, device=dev)[:b]
    moved = 2 * nbytes(state[:b]) + 2 * nbytes(x) + nbytes(w, bias)
    t = timed(lambda: kernel(x, state, w, bias, slots, silu=True), dev, iters, warmup)
    t_ref = timed(
        lambda: reference.conv_update_ref(x, state, w, bias, slots, silu=True), dev, iters, warmup
    )
    return {**rate(moved, t), "torch_ms": t_ref * 1e3}


def ssm_update(s, dev, smoke, iters, warmup) -> dict:
    return {f"b{b}": _ssm_case(s, dev, b, iters, warmup) for b in _decode_batches(smoke)}


def _decode_batches(smoke: bool) -> tuple[int, ...]:
    return (1, 3) if smoke else (1, 64, 256)


def _ssm_case(s, dev, b, iters, warmup) -> dict:
    from jamba_ray.model.kernels.decode import ssm_update as kernel

    di, n = s["di"], s["n"]
    ssm = torch.randn(b + 1, di, n, device=dev)
    u, dt = torch.randn(b, di, device=dev), torch.rand(b, di, device=dev) * 0.1
    A = -torch.rand(di, n, device=dev)
    B, C = torch.randn(b, n, device=dev), torch.randn(b, n, device=dev)
    slots = torch.randperm(b + 1, device=dev)[:b]
    moved = 2 * nbytes(ssm[:b]) + nbytes(u, dt, A, B, C) + nbytes(u)
    t = timed(lambda: kernel(u, dt, A, B, C, ssm, slots), dev, iters, warmup)
    t_ref = timed(lambda: reference.ssm_update_ref(u, dt, A, B, C, ssm, slots), dev, iters, warmup)
    return {**rate(moved, t), "torch_ms": t_ref * 1e3}


def varlen_scan(s, dev, smoke, iters, warmup) -> dict:
    cases = {"1x16": [16], "3x5": [5] * 3} if smoke else {"1x2048": [2048], "8x256": [256] * 8}
    return {name: _scan_case(s, dev, lengths, iters, warmup) for name, lengths in cases.items()}


def _scan_case(s, dev, lengths, iters, warmup) -> dict:
    from jamba_ray.model.kernels.scan import varlen_scan as kernel
    from jamba_ray.model.scan import chunked_scan

    di, n, t_all = s["di"], s["n"], sum(lengths)
    u, dt = torch.randn(t_all, di, device=dev), torch.rand(t_all, di, device=dev) * 0.1
    A = -torch.rand(di, n, device=dev)
    B, C = torch.randn(t_all, n, device=dev), torch.randn(t_all, n, device=dev)
    ssm = torch.zeros(len(lengths), di, n, device=dev)
    cu = torch.tensor([0] + lengths, device=dev).cumsum(0)
    slots = torch.arange(len(lengths), device=dev)
    moved = nbytes(u, dt, B, C, u) + 2 * nbytes(ssm) + nbytes(A)
    t = timed(lambda: kernel(u, dt, A, B, C, ssm, cu, slots), dev, iters, warmup)
    bounds = cu.tolist()

    def torch_path():  # the torch scan, one segment at a time
        for g in range(len(lengths)):
            r = slice(bounds[g], bounds[g + 1])
            chunked_scan(u[r], dt[r], A, B[r], C[r], ssm[g])

    t_ref = timed(torch_path, dev, max(1, iters // 10), min(warmup, 1))
    return {**rate(moved, t), "torch_chunked_ms": t_ref * 1e3}


def moe(s, dev, smoke, iters, warmup) -> dict:
    """Ours (sorted by expert, one grouped GEMM per projection) vs transformers' experts."""
    from transformers import JambaConfig
    from transformers.models.jamba.modeling_jamba import JambaExperts

    from jamba_ray.model.kernels import moe as ours

    cfg = JambaConfig(
        hidden_size=s["h"],
        intermediate_size=s["inter"],
        num_experts=s["e"],
        num_experts_per_tok=s["top_k"],
    )
    with torch.device("meta"):
        experts = JambaExperts(cfg)
    experts = experts.to_empty(device=dev).to(torch.bfloat16)
    for p in experts.parameters():
        p.data.normal_(0, 0.02)
    ours.register()
    return {
        f"t{t_n}": _moe_case(s, dev, cfg, experts, t_n, iters, warmup)
        for t_n in ((1, 8) if smoke else (1, 8, 64, 256, 2048))
    }


def _moe_case(s, dev, cfg, experts, t_n, iters, warmup) -> dict:
    from jamba_ray.model.kernels import moe as ours

    expert_bytes = nbytes(experts.gate_up_proj[0], experts.down_proj[0])
    x = torch.randn(t_n, s["h"], device=dev, dtype=torch.bfloat16)
    w, ids = ours.route(torch.randn(t_n, s["e"], device=dev), s["top_k"])
    w = w.to(torch.bfloat16)
    hit = int(ids.unique().numel())
    moved = hit * expert_bytes + 2 * nbytes(x)
    row = {"experts_hit": hit}
    for impl in ("jamba_ray", "eager", "grouped_mm"):  # ours, then transformers' two

        def run(impl=impl):
            cfg._experts_implementation = impl
            return experts(x, ids, w)

        t = guarded(timed, run, dev, iters, warmup)
        row[impl] = t if isinstance(t, dict) else rate(moved, t)
    return row
