"""The cluster prefix tier: a fresh engine's first request on a prefix another engine computed,
time to first token with the tier (imported) vs without (cold).

    python benchmarks/prefix_tier.py [--model small|tiny] [--stages 2] [--prefix 1536] [--json]

An engine publishes `--trials` different prefixes (`--prefix` tokens each) to the tier and stops
(a replica gone). A fresh engine with the tier then answers each prefix + a 24-token question
(the first request on that prefix it sees: an import), and a fresh engine without the tier the
same (computed whole). Both engines are warmed up on an unrelated prompt first. Stages run as Ray
actors, as in serving; the tier actor is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import ray
from prefix import engine, first_token_s
from throughput import prompts, small_checkpoint


def tier_row(path, stages: int, prefix_len: int, trials: int, vocab: int) -> dict:
    from jamba_ray.runtime.prefix_tier import NAMESPACE

    tier = dict(prefix_tier=True, prefix_tier_min_tokens=64)
    cpus = dict(num_cpus_per_stage=0.5)  # (a fixed share: engines start while others stop)
    systems = [prompts(1, prefix_len, vocab, seed=10 + i)[0] for i in range(trials)]
    question = prompts(1, 25, vocab, seed=99)[0][1:]
    warmup = prompts(1, 64, vocab, seed=9)[0]

    publisher = engine(path, stages, **cpus, **tier)
    for s in systems:
        first_token_s(publisher, s, max_tokens=2)  # (its checkpoint goes out with the next step)
    client = publisher.kv.tier.client
    deadline = time.monotonic() + 120
    expected = trials * -(-prefix_len // 256)  # (a checkpoint every 256 tokens, and the end)
    while ray.get(client.actor.stats.remote())["entries"] < expected:
        assert time.monotonic() < deadline, "the publishes never landed"
        time.sleep(0.2)
    publisher.shutdown()

    times, tokens = {}, {}
    for name, kw in (("cold", {}), ("tier", tier)):
        eng = engine(path, stages, **cpus, **kw)
        first_token_s(eng, warmup)
        runs = [first_token_s(eng, s + question) for s in systems]
        times[name], tokens[name] = [t for t, _ in runs], [toks for _, toks in runs]
        if name == "tier":
            imported = eng.kv.tier.counters["tier_imported_tokens"]
            tier_stats = ray.get(client.actor.stats.remote())
        eng.shutdown()
    ray.kill(ray.get_actor(client.name, namespace=NAMESPACE))
    return {
        "prefix_tokens": prefix_len,
        "prompt_tokens": prefix_len + len(question),
        "cold_ttft_s": statistics.median(times["cold"]),
        "tier_ttft_s": statistics.median(times["tier"]),
        "imported_tokens": imported,
        "same_tokens": tokens["cold"] == tokens["tier"],
        "tier_bytes": tier_stats["bytes"],
        "tier_entries": tier_stats["entries"],
        "trials": trials,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("small", "tiny"), default="small")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=1536)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.model == "small":
        path = small_checkpoint()
    else:
        from jamba_ray.tiny import ensure_default_tiny

        path = ensure_default_tiny()
    ray.init(include_dashboard=False, log_to_driver=False)
    row = tier_row(
        path, args.stages, args.prefix, args.trials, 4096 if args.model == "small" else 512
    )
    row.update(model=args.model, stages=args.stages, machine=platform.machine())
    if args.json:
        print(json.dumps(row))
        return
    print(
        f"| {args.model}, {args.stages} stages | {row['prefix_tokens']}-token prefix + 24 | "
        f"{row['cold_ttft_s'] * 1000:.0f} ms | {row['tier_ttft_s'] * 1000:.0f} ms | "
        f"{row['imported_tokens']} imported, same tokens: {row['same_tokens']}, "
        f"tier {row['tier_bytes'] / 2**20:.1f} MiB |"
    )


if __name__ == "__main__":
    main()
