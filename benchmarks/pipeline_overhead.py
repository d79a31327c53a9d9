"""The pipeline's own overhead: S stage actors that do nothing, one step through all of them.

    python benchmarks/pipeline_overhead.py [--stages 2 4] [--steps 300] [--json]
    python benchmarks/pipeline_overhead.py --llm [--rounds 5] [--json]

Per-task: each step is S chained actor calls (what `RayPipeline` does today: the message and the
hidden states go as task arguments through the object store). Compiled: the same actors bound
once into a Ray Compiled Graph (`ray.dag`), each step one `execute` through its shared-memory
channels. The payload is a small message and a [1, 64] float32 hidden state (a batch-1 decode on
the tiny model), so what is timed is the mechanism, not the compute.

`--llm`: the same two paths end to end, `LLM(...)` on the tiny default (2 stages, Ray backend),
`transport: object_store` (per-task) vs `compiled`: a batch-1 decode's ms per token (a 65-token
generation less a 1-token one, over 64) and a 500-token prefill (one micro-batch, to the first
token). Both engines are up at once and the rounds alternate, so load on the machine falls on both
alike; fresh random prompts each time (no prefix-cache hit). The median round is shown.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import ray


@ray.remote(num_cpus=0.1)
class NoopStage:
    def forward(self, item):
        msg, x = item
        return msg, x  # hand both on, as a stage hands its hidden states to the next


def per_task_ms(stages, item, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ref = item
        for s in stages:
            ref = s.forward.remote(ref)
        ray.get(ref)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def compiled_ms(stages, item, steps: int) -> list[float]:
    from ray.dag import InputNode

    with InputNode() as inp:
        node = inp
        for s in stages:
            node = s.forward.bind(node)
    graph = node.experimental_compile()
    try:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            ray.get(graph.execute(item))
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    finally:
        graph.teardown()


def row(name: str, s: int, times: list[float]) -> dict:
    warm = times[len(times) // 10 :]  # the first tenth warms the path up
    p50 = statistics.median(warm)
    return {
        "path": name,
        "stages": s,
        "p50_ms": p50,
        "p99_ms": float(np.percentile(warm, 99)),
        "per_stage_ms": p50 / s,
    }


def llm_rows(rounds: int) -> list[dict]:
    from jamba_ray import LLM, SamplingParams

    rng = np.random.default_rng(0)

    def timed(llm, prompt_len: int, tokens: int) -> float:
        prompt = rng.integers(3, 500, prompt_len).tolist()
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([prompt], params)
        return time.perf_counter() - t0

    paths = {"per-task (object_store)": "object_store", "compiled graph": "compiled"}
    llms = {
        name: LLM(num_stages=2, transport=t, num_cpus_per_stage=0.5, enable_prefix_caching=False)
        for name, t in paths.items()
    }
    got: dict[str, dict[str, list[float]]] = {n: {"decode": [], "prefill": []} for n in llms}
    try:
        for llm in llms.values():  # warm-up: both paths, both shapes
            timed(llm, 500, 1), timed(llm, 8, 17)
        for _ in range(rounds):
            for name, llm in llms.items():
                long, short = timed(llm, 8, 65), timed(llm, 8, 1)
                got[name]["decode"].append((long - short) / 64 * 1e3)
                got[name]["prefill"].append(timed(llm, 500, 1) * 1e3)
    finally:
        for llm in llms.values():
            llm.shutdown()
    return [
        {
            "path": name,
            "decode_ms_per_token": statistics.median(g["decode"]),
            "prefill_500_ms": statistics.median(g["prefill"]),
            "decode_rounds": [round(v, 2) for v in g["decode"]],
            "prefill_rounds": [round(v, 1) for v in g["prefill"]],
        }
        for name, g in got.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--llm", action="store_true", help="end to end through LLM(...) instead")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.llm:
        rows = llm_rows(a.rounds)
        if a.json:
            print(json.dumps(rows))
            return
        print(f"LLM end to end, tiny default, 2 stages, {a.rounds} rounds, {platform.machine()}")
        print("| path | decode ms/token (batch 1) | 500-token prefill ms |")
        print("|---|---:|---:|")
        for r in rows:
            print(f"| {r['path']} | {r['decode_ms_per_token']:.2f} | {r['prefill_500_ms']:.1f} |")
        print("rounds:", json.dumps(rows))
        return
    ray.init(include_dashboard=False, log_to_driver=False)
    item = ({"step_id": 1, "segments": [(1, 0, 7, 1)]}, np.zeros((1, 64), np.float32))
    rows = []
    for s in a.stages:
        stages = [NoopStage.remote() for _ in range(s)]
        ray.get([st.forward.remote(item) for st in stages])
        rows.append(row("per-task", s, per_task_ms(stages, item, a.steps)))
        rows.append(row("compiled graph", s, compiled_ms(stages, item, a.steps)))
        for st in stages:
            ray.kill(st)
    ray.shutdown()
    if a.json:
        print(json.dumps(rows))
        return
    print(f"pipeline overhead, no-op stages, {a.steps} steps, {platform.machine()}")
    print("| path | stages | round trip p50 ms | p99 ms | per stage per step ms |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['path']} | {r['stages']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['per_stage_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
