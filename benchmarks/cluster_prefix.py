"""Prefix reuse across engine replicas: Serve's default router vs the prefix router vs the prefix
router with the cluster prefix tier, on one shared-prefix workload, in one run.

    python benchmarks/cluster_prefix.py [--preset small] [--prefixes 16] [--users 8]
                                        [--prefix-len 1536] [--concurrency 8] [--json]

Two engine replicas (one pipeline each, 1 CPU stage) behind the ingress, over HTTP on loopback.
The workload: `--prefixes` distinct system prompts of `--prefix-len` random tokens, `--users`
users each (a short question of their own after the shared prompt), then every user's second turn
(first turn + its answer + a new question): a chat whose history must be found again. Requests go
in a seeded random order, `--concurrency` at a time, streamed; TTFT is the first streamed token.
Hit rate = prompt tokens reported cached (`usage.prompt_tokens_details.cached_tokens`) / prompt
tokens, the single-replica hit rate on the same workload is the reference for the 2-replica ones.

Then the new-replica check (tier on): the app is deleted and deployed again (fresh replicas, the
tier's detached actor stays); the first request on a known prefix vs one on an unseen prefix.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "jamba-bench"
APP = "cluster-prefix"


def checkpoint(preset: str) -> Path:
    from jamba_ray.tiny import TinySpec, default_tiny_dir, ensure_default_tiny, init_tiny

    if preset == "tiny":
        return ensure_default_tiny()
    path = default_tiny_dir().parent / preset
    if not (path / "model.safetensors.index.json").exists():
        init_tiny(path, TinySpec(preset=preset, max_shard_size="50MB"))
    return path


def workload(a, vocab: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(system prompts, per prompt the users' first-turn questions)."""
    rng = random.Random(0)
    prefixes = [
        [1] + [rng.randrange(3, vocab) for _ in range(a.prefix_len - 1)] for _ in range(a.prefixes)
    ]
    questions = [
        [[rng.randrange(3, vocab) for _ in range(rng.randrange(8, 24))] for _ in range(a.users)]
        for _ in range(a.prefixes)
    ]
    return prefixes, questions


def complete(base: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: TTFT, the answer's tokens, prompt and cached token counts."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0, ttft, text, usage = time.perf_counter(), None, "", None
    with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices", []):
                if ttft is None and c.get("text") is not None:
                    ttft = time.perf_counter() - t0
                text += c.get("text") or ""
            usage = chunk.get("usage") or usage
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {"ttft": ttft, "text": text, "prompt": usage["prompt_tokens"], "cached": cached}


def tokens_of(base: str, text: str) -> list[int]:
    """The answer as the next turn's prompt holds it: its text tokenized again (as a chat template
    would), which may differ from the generated ids; the cache then reuses up to the difference."""
    body = {"model": MODEL, "prompt": text, "add_special_tokens": False}
    return requests.post(f"{base}/tokenize", json=body, timeout=60).json()["tokens"]


def run_workload(base: str, a, prefixes, questions) -> dict:
    rng = random.Random(1)
    firsts = [(p, u) for p in range(len(prefixes)) for u in range(a.users)]
    rng.shuffle(firsts)
    answers: dict[tuple[int, int], list[int]] = {}

    def first(pu):
        p, u = pu
        prompt = prefixes[p] + questions[p][u]
        out = complete(base, prompt, a.max_tokens)
        answers[pu] = prompt + tokens_of(base, out["text"])
        return out

    def second(pu):
        follow = [7 + pu[1], 11, 13]  # the user's next question
        return complete(base, answers[pu] + follow, a.max_tokens)

    with cf.ThreadPoolExecutor(a.concurrency) as pool:
        outs = list(pool.map(first, firsts))
        rng.shuffle(firsts)
        outs += list(pool.map(second, firsts))
    ttfts = sorted(o["ttft"] for o in outs)
    prompt = sum(o["prompt"] for o in outs)
    return {
        "requests": len(outs),
        "hit_rate": sum(o["cached"] for o in outs) / prompt,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
    }


def deploy(path: Path, a, replicas: int, policy: str, tier: bool):
    from ray import serve

    from jamba_ray.config.pipeline_file import PipelineFile
    from jamba_ray.serve.app import deployment

    pipeline = PipelineFile.default().with_overrides(
        **{
            "num_stages": 1,
            "num_cpus_per_stage": 0.5,
            # Each replica's share of the box's cores: the default layout's 2 threads per stage
            # would put 2 replicas' 4 threads on 2 cores (oversubscribed, every step slower).
            "threads_per_stage": max(1, (os.cpu_count() or 1) // replicas),
            "max_model_len": a.prefix_len + 128,
            "serve.served_model_name": MODEL,
            "serve.router.policy": policy,
            "serve.autoscaling.min_replicas": replicas,
            "serve.autoscaling.max_replicas": replicas,
            "serve.replica_cpus": 0.1,
            "prefix_tier": tier,
        }
    )
    serve.run(deployment(pipeline.to_config(str(path))), name=APP, route_prefix="/", blocking=False)


def wait_ready(base: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError("the app did not come up")


def undeploy() -> None:
    from ray import serve

    serve.delete(APP)


def new_replica(base: str, path: Path, a, prefixes, vocab: int) -> dict:
    """Fresh replicas (tier on) after a first app computed `prefixes[0]`: the first request on it
    vs one on a prefix no replica has seen."""
    rng = random.Random(2)
    unseen = [1] + [rng.randrange(3, vocab) for _ in range(a.prefix_len - 1)]
    undeploy()
    deploy(path, a, 2, "prefix", True)
    wait_ready(base)
    warm = complete(base, prefixes[0] + [5, 6, 7], 1)
    cold = complete(base, unseen + [5, 6, 7], 1)
    return {"warm_ttft": warm["ttft"], "warm_cached": warm["cached"], "cold_ttft": cold["ttft"]}


def table(r: dict) -> str:
    single = r["runs"]["1 replica, prefix router"]
    base_p50 = r["runs"]["2 replicas, default router"]["ttft_p50"]
    lines = [
        f"{r['prefixes']} system prompts x {r['users']} users + their second turns, prefix "
        f"{r['prefix_len']} tokens, {r['preset']} preset, 1 stage per replica; {r['machine']}",
        "",
        "| run | requests | hit rate | vs 1 replica | TTFT p50 (s) | vs default p50 "
        "| TTFT p99 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, x in r["runs"].items():
        lines.append(
            f"| {name} | {x['requests']} | {x['hit_rate']:.1%} | "
            f"{x['hit_rate'] / single['hit_rate']:.0%} | {x['ttft_p50']:.3f} | "
            f"{x['ttft_p50'] / base_p50:.2f}x | {x['ttft_p99']:.3f} |"
        )
    n = r["new_replica"]
    lines += [
        "",
        f"new replica (tier on): first request on a known prefix {n['warm_ttft']:.3f} s "
        f"({n['warm_cached']} tokens cached) vs unseen prefix {n['cold_ttft']:.3f} s: "
        f"{n['warm_ttft'] / n['cold_ttft']:.2f}x",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--prefixes", type=int, default=16)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=1536)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import ray
    from ray import serve

    path = checkpoint(a.preset)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prefixes, questions = workload(a, vocab)
    base = f"http://127.0.0.1:{a.port}"
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    runs = {}
    try:
        for name, replicas, policy, tier in (
            ("1 replica, prefix router", 1, "prefix", False),
            ("2 replicas, default router", 2, "default", False),
            ("2 replicas, prefix router", 2, "prefix", False),
            ("2 replicas, prefix router + tier", 2, "prefix", True),
        ):
            deploy(path, a, replicas, policy, tier)
            wait_ready(base)
            print(f"{name} ...", file=sys.stderr)
            runs[name] = run_workload(base, a, prefixes, questions)
            print(f"{name}: {runs[name]}", file=sys.stderr)
            if not tier:
                undeploy()
        fresh = new_replica(base, path, a, prefixes, vocab)
    finally:
        serve.shutdown()
        ray.shutdown()
    r = {
        "preset": a.preset,
        "prefixes": a.prefixes,
        "users": a.users,
        "prefix_len": a.prefix_len,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU fp32",
        "runs": runs,
        "new_replica": fresh,
    }
    print(json.dumps(r, indent=1) if a.json else table(r))


if __name__ == "__main__":
    main()
