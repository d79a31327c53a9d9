"""A Jamba-v0.1-sized stage (layers 0-7: 1 attention, 3 Mamba/MLP, 4 Mamba/MoE) driven in-process:
decode steps at several batches (bf16 eagerly, as CUDA graphs, with the kernels or MoE path
switched; int8), prefill of one long prompt, and transformers' JambaModel of the same 8 layers on
the same device beside it. Random weights: timing only (parity is checked on the tiny model).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from benchmarks.gpu_util import empty_cache, guarded, timed
from jamba_ray.engine.messages import Segment, StepMessage
from jamba_ray.model import kernels
from jamba_ray.model.decode_graphs import DecodeGraphs
from jamba_ray.model.kernels import moe
from jamba_ray.model.slice import SliceModel
from jamba_ray.model.state_pool import StatePool

BLOCK = 16
PROMPT = 16  # tokens each sequence holds before the timed decode steps
SMALL = dict(  # --cpu-smoke: the same layer layout, small widths
    hidden_size=256,
    intermediate_size=512,
    num_experts=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=1024,
    mamba_dt_rank=16,
)


@dataclass(frozen=True, slots=True)
class Sizes:
    """What `SliceModel.pool_shape` reads of a StageSpec."""

    slots: int
    blocks: int
    max_len: int
    block_size: int = BLOCK
    checkpoints: int = 0


def jamba_config(smoke: bool, experts: str | None = "eager"):
    from transformers import JambaConfig

    cfg = JambaConfig(num_hidden_layers=8, **(SMALL if smoke else {}))  # Jamba-v0.1 defaults
    if experts is not None:
        cfg._experts_implementation = experts
    return cfg


def init_weights(model, dev: str) -> None:
    """Random weights of the right scale; A_log and D as Jamba initialises them, kept in fp32."""
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            a = torch.arange(1, p.shape[1] + 1, device=dev, dtype=torch.float32)
            p.data = torch.log(a).expand(p.shape).contiguous()
        elif name.endswith(".D"):
            p.data = torch.ones(p.shape, device=dev)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0, 0.02, generator=gen)


def build_stage(cfg, dev: str, dtype=torch.bfloat16) -> SliceModel:
    with torch.device("meta"):
        model = SliceModel(cfg, 0, 8, first=False, last=False)
    model = model.to_empty(device=dev).to(dtype)
    init_weights(model, dev)
    return model.eval()


def stage_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class Batch:
    """A pool for `rows` sequences of up to `max_len` tokens (+ the scratch slot and block the
    fixed-shape steps pad with), each sequence on its own slot and run of blocks, prefilled."""

    def __init__(self, model, cfg, dev, rows: int, max_len: int, prompt: int = PROMPT):
        self.per = -(-max_len // BLOCK)
        self.sizes = Sizes(rows + 1, rows * self.per + 1, max_len)
        self.pool = StatePool(model.pool_shape(cfg, self.sizes), torch.bfloat16, dev)
        self.tables = {i: list(range(i * self.per, (i + 1) * self.per)) for i in range(rows)}
        self.model, self.cfg, self.dev, self.prompt = model, cfg, dev, prompt
        if prompt:
            msg = StepMessage(0, tuple(self.segment(i, 0, prompt) for i in range(rows)))
            self.run(msg, self.hidden(rows * prompt))

    def segment(self, i: int, start: int, length: int) -> Segment:
        return Segment(i, i, start, length, "none", blocks=tuple(self.tables[i]))

    def hidden(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.hidden_size, device=self.dev, dtype=torch.bfloat16)

    def run(self, msg, x):
        with torch.inference_mode():
            return self.model(msg, x, self.pool, self.tables)

    def decode_msg(self, b: int) -> StepMessage:
        return StepMessage(1, tuple(self.segment(i, self.prompt, 1) for i in range(b)))

    def graphs(self) -> DecodeGraphs:
        return DecodeGraphs(
            self.model,
            self.pool,
            self.cfg,
            first=False,
            device=self.dev,
            dtype=torch.bfloat16,
            scratch_slot=self.sizes.slots - 1,
            scratch_block=self.sizes.blocks - 1,
            max_batch=self.sizes.slots - 1,
        )


@contextlib.contextmanager
def kernels_off():
    """The layers' torch paths on CUDA too (the comparison the kernels are measured against)."""
    before = kernels.enabled_for
    kernels.enabled_for = lambda t: False
    try:
        yield
    finally:
        kernels.enabled_for = before


@contextlib.contextmanager
def experts(cfg, impl: str):
    before = cfg._experts_implementation
    cfg._experts_implementation = impl
    try:
        yield
    finally:
        cfg._experts_implementation = before


def decode_row(model, cfg, batch: Batch, b: int, dev, iters, warmup) -> dict:
    """One eager decode step of b rows: time, tokens/s and the bytes it must read per second."""
    msg, x = batch.decode_msg(b), batch.hidden(b)
    t = timed(lambda: batch.run(msg, x), dev, iters, warmup)
    experts_mods = [m for n, m in model.named_modules() if n.endswith("feed_forward.experts")]
    all_experts = sum(stage_bytes(m) for m in experts_mods)  # bf16 or int8 (+ scales)
    per_expert = all_experts / max(1, len(experts_mods) * cfg.num_experts)
    hit = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** b)
    weights = stage_bytes(model) - all_experts + len(experts_mods) * hit * per_expert
    pool = batch.pool
    state = b * 2 * (pool.conv[:, 0].numel() * 2 + pool.ssm[:, 0].numel() * 4)
    kv = b * 2 * pool.k.shape[0] * pool.k.shape[2] * (PROMPT + 1) * pool.k.shape[4] * 2
    return {"step_ms": t * 1e3, "tok_s": b / t, "gbps": (weights + state + kv) / t / 1e9}


def decode(model, cfg, dev, batches, variants, iters=20, warmup=3, max_len=2048) -> dict:
    """Per batch, each variant: name -> context manager the step runs in."""
    batch = Batch(model, cfg, dev, max(batches), max_len)
    out = {}
    for b in batches:
        row = {}
        for name, ctx in variants.items():
            with ctx():
                row[name] = guarded(decode_row, model, cfg, batch, b, dev, iters, warmup)
        out[b] = row
    del batch
    empty_cache(dev)
    return out


def graph_decode(model, cfg, dev, batches, iters=20, warmup=3, max_len=2048) -> dict:
    """The same steps through DecodeGraphs (one CUDA graph per batch), checked against eager."""
    batch = Batch(model, cfg, dev, max(batches), max_len)
    graphs = batch.graphs()
    out = {}
    for b in batches:
        row = _graph_row(batch, graphs, b, dev, iters, warmup)
        if row is None:  # capture failed: the reason is in the stats
            break
        out[b] = row
    out["stats"] = graphs.stats()
    empty_cache(dev)
    return out


def _graph_row(batch: Batch, graphs: DecodeGraphs, b: int, dev, iters, warmup) -> dict | None:
    msg, x, pool = batch.decode_msg(b), batch.hidden(b), batch.pool
    saved = (pool.conv.clone(), pool.ssm.clone())
    with torch.inference_mode():
        want = batch.run(msg, x)
        pool.conv.copy_(saved[0])
        pool.ssm.copy_(saved[1])
        got = graphs.run(msg, x, batch.tables)
        pool.conv.copy_(saved[0])
        pool.ssm.copy_(saved[1])
    if got is None:
        return None

    def step():
        with torch.inference_mode():
            graphs.run(msg, x, batch.tables)

    t = timed(step, dev, iters, warmup)
    return {
        "step_ms": t * 1e3,
        "tok_s": b / t,
        "max_diff_vs_eager": float((got - want).abs().max()),
    }


def prefill(model, cfg, dev, lengths, budget_s: float, iters=2, warmup=1) -> dict:
    """One prompt of each length from a fresh slot; lengths whose estimated time (linear from the
    previous one) would pass `budget_s` are skipped, with the estimate."""
    out, per_token = {}, None
    for n in lengths:
        if per_token is not None and per_token * n * (iters + warmup) > budget_s:
            out[n] = {"skipped": f"estimated {per_token * n:.0f} s per prefill"}
            continue
        out[n] = guarded(_prefill_one, model, cfg, dev, n, iters, warmup)
        if "ms" in out[n]:
            per_token = out[n]["ms"] / 1e3 / n
        empty_cache(dev)
    return out


def _prefill_one(model, cfg, dev, n, iters, warmup) -> dict:
    batch = Batch(model, cfg, dev, 1, n, prompt=0)
    msg, x = StepMessage(0, (batch.segment(0, 0, n),)), batch.hidden(n)

    def step():
        batch.pool.start(0)
        batch.run(msg, x)

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timed(step, dev, iters, warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return {"ms": t * 1e3, "tok_s": n / t, "peak_gib": peak}


def ours(dev, smoke, batches, prefill_lengths, budget_s) -> dict:
    """bf16 (kernels on/off, MoE eager/grouped, CUDA graphs), then int8, on one stage."""
    cfg = jamba_config(smoke)
    moe.register()
    model = build_stage(cfg, dev)
    iters, warmup = (2, 1) if smoke else (20, 3)
    res = {"stage_gib_bf16": stage_bytes(model) / 2**30}
    variants = {"eager": contextlib.nullcontext}
    if dev == "cuda":  # on the CPU the layers never call the kernels: nothing to switch
        variants["kernels_off"] = kernels_off
    variants["moe_grouped"] = lambda: experts(cfg, "jamba_ray")
    res["decode_bf16"] = guarded(decode, model, cfg, dev, batches, variants, iters, warmup)
    res["decode_graphs_bf16"] = guarded(graph_decode, model, cfg, dev, batches, iters, warmup)
    res["prefill_bf16"] = guarded(prefill, model, cfg, dev, prefill_lengths, budget_s)
    from jamba_ray.model.quant import quantize_slice

    quantize_slice(model)
    empty_cache(dev)
    res["stage_gib_int8"] = stage_bytes(model) / 2**30
    plain = {"eager": contextlib.nullcontext}
    res["decode_int8"] = guarded(decode, model, cfg, dev, batches, plain, iters, warmup)
    res["prefill_int8"] = guarded(prefill, model, cfg, dev, prefill_lengths[:1], budget_s)
    del model
    empty_cache(dev)
    return res


def transformers_stage(dev, smoke, batches, prefill_lengths, budget_s) -> dict:
    """transformers' JambaModel of the same 8 layers, with the implementations it picks itself
    (experts, attention; mamba-ssm/causal-conv1d kernels when installed), on the same device."""
    from transformers.models.jamba.modeling_jamba import JambaModel

    cfg = jamba_config(smoke, experts=None)
    with torch.device("meta"):
        model = JambaModel(cfg)
    model = model.to_empty(device=dev).to(torch.bfloat16).eval()
    init_weights(model, dev)
    res = {
        "experts_implementation": cfg._experts_implementation,
        "attn_implementation": cfg._attn_implementation,
    }
    iters, warmup = (2, 1) if smoke else (20, 3)
    res["decode_bf16"] = {
        b: guarded(_hf_decode, model, cfg, dev, b, iters, warmup) for b in batches
    }
    out, per_token = {}, None
    for n in prefill_lengths:
        if per_token is not None and per_token * n * 3 > budget_s:
            out[n] = {"skipped": f"estimated {per_token * n:.0f} s per prefill"}
            continue
        out[n] = guarded(_hf_prefill, model, cfg, dev, n)
        per_token = out[n]["ms"] / 1e3 / n if "ms" in out[n] else per_token
        empty_cache(dev)
    res["prefill_bf16"] = out
    del model
    empty_cache(dev)
    return res


def _hf_decode(model, cfg, dev, b, iters, warmup) -> dict:
    def embeds(n):
        return torch.randn(b, n, cfg.hidden_size, device=dev, dtype=torch.bfloat16)

    with torch.inference_mode():
        cache = model(inputs_embeds=embeds(PROMPT), use_cache=True).cache
        x = embeds(1)

        def step():
            model(inputs_embeds=x, cache=cache, use_cache=True)

        t = timed(step, dev, iters, warmup)  # the cache grows by one token per step
    empty_cache(dev)
    return {"step_ms": t * 1e3, "tok_s": b / t}


def _hf_prefill(model, cfg, dev, n) -> dict:
    x = torch.randn(1, n, cfg.hidden_size, device=dev, dtype=torch.bfloat16)

    def step():
        with torch.inference_mode():
            model(inputs_embeds=x, use_cache=True)

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timed(step, dev, 2, 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    return {"ms": t * 1e3, "tok_s": n / t, "peak_gib": peak}
