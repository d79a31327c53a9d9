"""What prefix-cache keys cost per prompt token: Python's hash() chain (before) vs SHA-256 (now).

    python benchmarks/prefix_keys.py [--tokens 32768] [--block-size 16] [--json]

Every lookup keys a prompt's full blocks (`PrefixCache.match`) and every landed block is keyed
once (`KVCache.land`); this times `block_keys` over one prompt, both ways, in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

from jamba_ray.engine.blocks import block_keys, root_key


def python_hash_keys(tokens: list[int], block_size: int) -> list[int]:
    """The keys before: hash((parent, tokens)), unsalted, 64 bits, collisions possible."""
    keys, parent = [], None
    for i in range(len(tokens) // block_size):
        parent = hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        keys.append(parent)
    return keys


def per_token_us(fn, tokens: list[int], repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(tokens)
        best = min(best, time.perf_counter() - t0)
    return best / len(tokens) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tokens = [random.Random(0).randrange(65536) for _ in range(a.tokens)]
    bs = a.block_size
    rows = {
        "hash() chain (before)": per_token_us(lambda t: python_hash_keys(t, bs), tokens),
        "SHA-256 chain (now)": per_token_us(lambda t: block_keys(t, bs), tokens),
        "SHA-256, cache_salt": per_token_us(
            lambda t: block_keys(t, bs, root=root_key("tenant")), tokens
        ),
    }
    if a.json:
        print(json.dumps(rows))
        return
    print(f"prefix keys, {a.tokens} tokens, blocks of {bs}, {platform.processor() or 'cpu'}")
    print("| keys | us per prompt token | ms per 32K-token prompt |")
    print("|---|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us:.3f} | {us * 32768 / 1000:.1f} |")


if __name__ == "__main__":
    main()
