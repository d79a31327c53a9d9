"""Paged state and prefix reuse: time to first token warm vs cold, and how many sequences fit.

    python benchmarks/prefix.py [--stages 2] [--system 1500] [--json]

(a) A shared system prompt (`--system` tokens) answered for two users, and a chat's second turn
    (the first prompt, its answer and a new message): time to first token with the prefix cache on
    (warm: the second user, the second turn) vs off (cold), same engine settings.
(b) Capacity: small preset, max_model_len 32768, 0.25 GiB of state per stage, 64 requests of ~256
    tokens at once: the most sequences running together, paged, vs what reserving max_model_len of
    KV per sequence (the contiguous layout before paging) allowed.
Stages run as Ray actors, as in serving.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from throughput import prompts, small_checkpoint


def engine(path, stages: int, **kw):
    from jamba_ray.engine.llm import LLM

    base = dict(
        num_stages=stages,
        max_num_seqs=16,
        max_model_len=4096,
        max_batched_tokens=512,
        state_memory_gib=1.0,
    )
    return LLM(str(path), **{**base, **kw}).engine


def first_token_s(eng, prompt: list[int], max_tokens: int = 16) -> tuple[float, list[int]]:
    """Seconds from submitting `prompt` alone to its first token, and all its tokens."""
    from jamba_ray.engine.sampling_params import SamplingParams

    t0, first, tokens = time.perf_counter(), [], []

    def sink(out):
        tokens.extend(t for o in out.outputs for t in o.token_ids)
        if tokens and not first:
            first.append(time.perf_counter() - t0)

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    eng.add_request(f"p{time.monotonic_ns()}", prompt, params, sink)
    while eng.has_work():
        eng.step()
    return first[0], tokens


def ttft_rows(path, stages: int, system_len: int) -> list[tuple[str, float, float]]:
    """(case, cold s, warm s) for a shared system prompt and a chat's second turn."""
    system = prompts(1, system_len, 4096, seed=1)[0]
    user1, user2, user3 = (prompts(1, 24, 4096, seed=s)[0][1:] for s in (2, 3, 4))
    results = {}
    for cache in (False, True):
        eng = engine(path, stages, enable_prefix_caching=cache)
        first_token_s(eng, prompts(1, 64, 4096, seed=9)[0])  # warm-up: load, first kernels
        _, answer = first_token_s(eng, system + user1)
        shared, _ = first_token_s(eng, system + user2)
        turn, _ = first_token_s(eng, system + user1 + answer + user3)
        results[cache] = (shared, turn)
        eng.shutdown()
    return [
        (
            f"shared {system_len}-token system prompt, second user",
            results[False][0],
            results[True][0],
        ),
        ("a chat's second turn", results[False][1], results[True][1]),
    ]


def long_checkpoint() -> Path:
    """The small preset with 32K positions (its default is 4K)."""
    from jamba_ray.tiny import TinySpec, default_tiny_dir, init_tiny

    path = default_tiny_dir().parent / "small-32k"
    if not (path / "model.safetensors.index.json").exists():
        spec = TinySpec(
            preset="small", max_shard_size="50MB", overrides=(("max_position_embeddings", 32768),)
        )
        init_tiny(path, spec)
    return path


def capacity_row(path, stages: int) -> tuple[int, int, int]:
    """(peak sequences running, contiguous-layout capacity, requests)."""
    from jamba_ray.config.capacity import per_stage
    from jamba_ray.engine.sampling_params import SamplingParams

    eng = engine(
        path,
        stages,
        max_num_seqs=64,
        max_model_len=32768,
        state_memory_gib=0.25,
        enable_prefix_caching=False,
        max_batched_tokens=1024,
    )
    slot_bytes, _ = per_stage(eng.plans, 1)
    kv_token = max(p.kv_bytes_per_token for p in eng.plans)
    contiguous = int(0.25 * 2**30 // (slot_bytes + kv_token * 32768))
    peak = 0
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts(64, 256, 4096, seed=5)):
        eng.add_request(f"c{i}", p, params, lambda out: None)
    while eng.has_work():
        eng.step()
        peak = max(peak, eng.stats_local()["requests_running"])
    eng.shutdown()
    return peak, contiguous, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--system", type=int, default=1500)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    path = small_checkpoint()
    ttft = ttft_rows(path, a.stages, a.system)
    peak, contiguous, total = capacity_row(long_checkpoint(), a.stages)
    ray.shutdown()
    if a.json:
        print(json.dumps({"ttft": ttft, "capacity": [peak, contiguous, total]}))
        return
    print(
        f"prefix reuse, small preset, {a.stages} stages; {platform.machine()}, "
        f"{torch.get_num_threads()} threads, CPU fp32\n"
    )
    print("| case | TTFT cold (cache off) s | TTFT warm (cache on) s | warm / cold |")
    print("|---|---:|---:|---:|")
    for case, cold, warm in ttft:
        print(f"| {case} | {cold:.3f} | {warm:.3f} | {warm / cold:.2f}x |")
    print("\n| capacity (max_model_len 32768, 0.25 GiB/stage) | sequences at once |")
    print("|---|---:|")
    print(f"| contiguous KV (max_model_len reserved per sequence) | {contiguous} |")
    print(f"| paged KV, {total} requests of 256 tokens (peak running) | {peak} |")


if __name__ == "__main__":
    main()
