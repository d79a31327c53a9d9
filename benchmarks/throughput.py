"""Decode throughput of the jamba-ray pipeline vs transformers on the same checkpoint.

    python benchmarks/throughput.py [--stages 2] [--tokens 64] [--transport p2p] [--decode-graphs]
                                    [--json]

Builds the `small` preset once (cached), then in one run measures: HF `generate` one request at
a time and as a padded batch of 8; then our engine one request at a time and with 8/32/64
concurrent requests (TTFT/TPOT percentiles and each stage's busy fraction), twice: first the
served default (`AsyncEngine`, as `serve` runs it: Ray stage actors, every option at its default),
then the same stages in-process (`backend: local`, no Ray between them), for the overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def small_checkpoint() -> Path:
    from jamba_ray.tiny import TinySpec, default_tiny_dir, init_tiny

    path = default_tiny_dir().parent / "small"
    if not (path / "model.safetensors.index.json").exists():
        init_tiny(path, TinySpec(preset="small", max_shard_size="50MB"))
    return path


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def hf_baseline(path: Path, ps: list[list[int]], tokens: int) -> dict:
    import torch
    from transformers import JambaForCausalLM

    model = JambaForCausalLM.from_pretrained(path).eval()
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(torch.tensor([ps[0]]), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        t0 = time.perf_counter()
        for p in ps[:4]:
            model.generate(torch.tensor([p]), **kw)
        seq = 4 * tokens / (time.perf_counter() - t0)
        batch = torch.tensor(ps[:8])  # equal lengths: left padding is a no-op
        t0 = time.perf_counter()
        model.generate(batch, attention_mask=torch.ones_like(batch), **kw)
        b8 = 8 * tokens / (time.perf_counter() - t0)
    return {"hf_batch1_tok_s": seq, "hf_batch8_tok_s": b8}


async def run_concurrent(engine, ps, tokens) -> dict:
    from jamba_ray.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    ttft, tpot = [], []

    async def one(p):
        t0 = time.perf_counter()
        first = last = None
        n = 0
        async for out in await engine.generate(p, params):
            now = time.perf_counter()
            first = first or now
            last = now
            n += sum(len(o.token_ids) for o in out.outputs)
        ttft.append(first - t0)
        if n > 1:
            tpot.append((last - first) / (n - 1))
        return n

    before = await engine.stats()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    total = sum(await asyncio.gather(*[one(p) for p in ps]))
    wall = time.perf_counter() - t0
    driver = (time.process_time() - cpu0) / wall
    after = await engine.stats()
    busy = [(a["busy_s"] - b["busy_s"]) / wall for a, b in zip(after["stages"], before["stages"])]
    return {
        "tok_s": total / wall,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": pct(tpot, 0.5),
        "tpot_p99": pct(tpot, 0.99),
        "busy": busy,
        "driver_cpu": driver,
    }


async def ours(
    path: Path, stages: int, ps, tokens: int, concurrency: list[int], **engine_opts
) -> dict:
    from jamba_ray.config import EngineConfig
    from jamba_ray.engine.async_engine import AsyncEngine

    cfg = EngineConfig.build(
        str(path), num_stages=stages, max_num_seqs=max(64, *concurrency), **engine_opts
    )
    engine = AsyncEngine(cfg)
    try:
        await run_concurrent(engine, ps[:2], 4)  # warm-up
        res = {"batch1": None, "concurrent": {}}
        singles = [await run_concurrent(engine, [p], tokens) for p in ps[:4]]
        res["batch1"] = {
            "tok_s": statistics.mean(s["tok_s"] for s in singles),
            "tpot_p50": statistics.median(s["tpot_p50"] for s in singles),
        }
        for c in concurrency:
            res["concurrent"][c] = await run_concurrent(engine, ps[:c], tokens)
        return res
    finally:
        engine.shutdown()


RUNS = {"ours": "served default (Ray stages)", "local": "in-process stages"}


def table(r: dict) -> str:
    hf1, hf8 = r["hf"]["hf_batch1_tok_s"], r["hf"]["hf_batch8_tok_s"]
    lines = [
        f"small preset, {r['stages']} stages, {r['tokens']} new tokens/request, "
        f"prompt {r['prompt_len']} tokens, transport {r['transport']}, "
        f"decode_graphs {r['decode_graphs']}; {r['machine']}",
        "",
        "| run | tok/s | vs HF | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | stage busy |",
        "|---|---:|---:|---:|---:|---:|",
        f"| HF generate, batch 1 (sequential) | {hf1:.1f} | 1.00x | | | |",
        f"| HF generate, padded batch 8 | {hf8:.1f} | 1.00x | | | |",
    ]
    for key, label in RUNS.items():
        if key not in r:
            continue
        b1 = r[key]["batch1"]
        lines.append(
            f"| {label}, batch 1 | {b1['tok_s']:.1f} | {b1['tok_s'] / hf1:.2f}x vs HF b1 | | "
            f"{b1['tpot_p50'] * 1e3:.1f} | |"
        )
        for c, x in r[key]["concurrent"].items():
            busy = " / ".join(f"{b:.0%}" for b in x["busy"])
            lines.append(
                f"| {label}, {c} concurrent | {x['tok_s']:.1f} | {x['tok_s'] / hf8:.2f}x vs HF b8 "
                f"| {x['ttft_p50']:.2f} / {x['ttft_p99']:.2f} | "
                f"{x['tpot_p50'] * 1e3:.1f} / {x['tpot_p99'] * 1e3:.1f} | {busy} |"
            )
    return "\n".join(lines)


def main() -> None:
    from jamba_ray.config.engine_config import TRANSPORTS

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--concurrency", default="8,32,64")
    ap.add_argument("--transport", default="auto", choices=TRANSPORTS)
    ap.add_argument("--no-local", action="store_true", help="skip the in-process run")
    ap.add_argument(
        "--decode-graphs",
        action="store_true",
        help="fixed-shape decode steps (CUDA graphs on GPUs)",
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import ray

    path = small_checkpoint()
    conc = [int(c) for c in a.concurrency.split(",")]
    ps = prompts(max(conc + [8]), a.prompt_len, 4096)
    hf = hf_baseline(path, ps, a.tokens)
    ray.init(include_dashboard=False, log_to_driver=False)
    opts = {"transport": a.transport} if a.transport != "auto" else {}
    if a.decode_graphs:
        opts["decode_graphs"] = True
    try:
        mine = asyncio.run(ours(path, a.stages, ps, a.tokens, conc, **opts))
        local = None
        if not a.no_local:
            local = asyncio.run(ours(path, a.stages, ps, a.tokens, conc, backend="local"))
    finally:
        ray.shutdown()
    r = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU fp32",
        "stages": a.stages,
        "tokens": a.tokens,
        "prompt_len": a.prompt_len,
        "transport": a.transport,
        "decode_graphs": a.decode_graphs,
        "hf": hf,
        "ours": mine,
        **({"local": local} if local else {}),
    }
    print(json.dumps(r, indent=1) if a.json else table(r))


if __name__ == "__main__":
    main()
