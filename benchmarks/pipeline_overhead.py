"""The pipeline's own overhead: S stage actors that do nothing, one step through all of them.

    python benchmarks/pipeline_overhead.py [--stages 2 4] [--steps 300] [--json]

Per-task: each step is S chained actor calls (what `RayPipeline` does today: the message and the
hidden states go as task arguments through the object store). Compiled: the same actors bound
once into a Ray Compiled Graph (`ray.dag`), each step one `execute` through its shared-memory
channels. The payload is a small message and a [1, 64] float32 hidden state (a batch-1 decode on
the tiny model), so what is timed is the mechanism, not the compute.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
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
