"""Per kernel op: each candidate implementation's state here (package not installed, not applicable
to these inputs, self-check pass or FAIL and why), which one the model runs, and the time of each
that passed beside the torch reference, at Jamba-v0.1 shapes (bf16 where the model runs bf16; the
SSM ops take fp32). On the CPU (--cpu-smoke) the packages are never offered and our Triton kernels
run interpreted on tiny shapes: that tests the script, the times are not measurements.
"""

from __future__ import annotations

import torch

from benchmarks.gpu_util import empty_cache, guarded, timed
from jamba_ray.model import kernels
from jamba_ray.model.kernels import packages, probes, selfcheck

PACKAGE = {
    "causal_conv1d_update": "causal-conv1d",
    "selective_state_update": "mamba-ssm",
    "flash_attn_with_kvcache": "flash-attn",
    "flash_attn_varlen_func": "flash-attn",
}
JAMBA = dict(b=64, di=8192, n=16, nh=32, kvh=8, hd=128, ctx=2048)
SMOKE = dict(b=3, di=48, n=8, nh=4, kvh=2, hd=16, ctx=9)
BF16, F32 = torch.bfloat16, torch.float32


def _randn(*shape, dev, dtype=F32):
    return torch.randn(*shape, device=dev).to(dtype)


def conv_inputs(s, dev, bs):
    b, di = s["b"], s["di"]
    slots = torch.randperm(b + 1, device=dev)[:b]
    state, x = _randn(b + 1, di, 4, dev=dev, dtype=BF16), _randn(b, di, dev=dev, dtype=BF16)
    return [x, state, _randn(di, 1, 4, dev=dev, dtype=BF16), _randn(di, dev=dev, dtype=BF16), slots]


def ssm_inputs(s, dev, bs):
    b, di, n = s["b"], s["di"], s["n"]
    slots = torch.randperm(b + 1, device=dev)[:b]
    u, dt = _randn(b, di, dev=dev), torch.rand(b, di, device=dev) * 0.1
    A, B, C = -torch.rand(di, n, device=dev), _randn(b, n, dev=dev), _randn(b, n, dev=dev)
    return [u, dt, A, B, C, _randn(b + 1, di, n, dev=dev), slots]


def paged_inputs(s, dev, bs):
    b, per = s["b"], -(-s["ctx"] // bs)
    shape = (b * per, s["kvh"], bs, s["hd"])
    k, v = _randn(*shape, dev=dev, dtype=BF16), _randn(*shape, dev=dev, dtype=BF16)
    table = torch.randperm(b * per, device=dev).view(b, per)  # each row's blocks, scattered
    q = _randn(b, s["nh"], s["hd"], dev=dev, dtype=BF16)
    return [q, k, v, table, torch.full((b,), s["ctx"], device=dev)]


def prefill_inputs(s, dev, bs):
    n, later = s["ctx"], s["ctx"] // 4  # a fresh prompt, and the last quarter of another
    cu_q = torch.tensor([0, n, n + later], device=dev)
    cu_k = torch.tensor([0, n, 2 * n], device=dev)
    q = _randn(n + later, s["nh"], s["hd"], dev=dev, dtype=BF16)
    k, v = (_randn(2 * n, s["kvh"], s["hd"], dev=dev, dtype=BF16) for _ in "kv")
    return [q, k, v, cu_q, cu_k]


def run_prefill(impl, a, s):
    q, k, v, cu_q, cu_k = a
    return impl(q, k, v, cu_q, cu_k, s["ctx"], s["ctx"], s["hd"] ** -0.5)


# (label, op, dtype the model calls it with, block size, Jamba-shape inputs or None: not timed)
CASES = (
    ("conv_update", "conv_update", BF16, 0, conv_inputs),
    ("ssm_update", "ssm_update", F32, 0, ssm_inputs),
    ("varlen_scan", "varlen_scan", F32, 0, None),  # timed in the kernels section: no package
    ("paged_decode, 16-token blocks", "paged_decode", BF16, 16, paged_inputs),
    ("paged_decode, 256-token blocks", "paged_decode", BF16, 256, paged_inputs),
    ("prefill", "prefill", BF16, 0, prefill_inputs),
)


def _absent(name: str, installed: dict) -> str:
    pkg = PACKAGE.get(name)
    if pkg is None:
        return "Triton cannot run here"
    if not installed[pkg]:
        return "not installed (or does not import)"
    return "not applicable (CPU tensors, dtype, block size, or a version without slot indexing)"


def _verdict(name: str, dev, dtype) -> str:
    key = f"{name}@{torch.device(dev)}/{dtype}"
    detail = selfcheck.stats()["kernel_checks"].get(key, "?")
    return "pass" if detail == "ok" else f"FAIL: {detail}"


def _run(op: str, impl, a, s):
    if op == "prefill":
        return run_prefill(impl, a, s)
    if op == "paged_decode":
        return impl(*a, s["hd"] ** -0.5)
    return probes.PROBES[op][1](impl, a)


def case(op, dtype, bs, make, dev, smoke, installed) -> dict:
    t = torch.empty(0, device=dev, dtype=dtype)
    row, impls = {}, {}
    for name, load in kernels.CANDIDATES[op]:
        fn = load(t, block_size=bs)
        if fn is None:
            row[name] = _absent(name, installed)
            continue
        probes.check(op, name, fn, kernels.REFERENCE[op], t.device, dtype)
        row[name] = _verdict(name, dev, dtype)
        if row[name] == "pass":
            impls[name] = fn
    chosen = kernels.choose(op, t, block_size=bs)
    row["runs"] = chosen[0] if chosen else "torch path"
    if make is not None:
        s = SMOKE if smoke else JAMBA
        iters, warmup = (1, 0) if smoke else (20, 3)
        a = make(s, dev, bs or 16)
        impls["torch reference"] = kernels.REFERENCE[op]
        row["ms"] = {
            name: guarded(lambda fn=fn: timed(lambda: _run(op, fn, a, s), dev, iters, warmup) * 1e3)
            for name, fn in impls.items()
        }
        empty_cache(dev)
    return row


def kernel_choice(dev: str, smoke: bool) -> dict:
    installed = packages.installed()
    out = {"packages": installed, "interpreted": dev != "cuda", "shapes": SMOKE if smoke else JAMBA}
    for label, op, dtype, bs, make in CASES:
        out[label] = guarded(case, op, dtype, bs, make, dev, smoke, installed)
    out["kernel_fallbacks"] = selfcheck.stats()["kernel_fallbacks"]
    return out
