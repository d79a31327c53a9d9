"""Stage recovery: what a SIGKILLed stage costs with recovery snapshots vs a full replay.

    python benchmarks/recovery.py [--seqs 64] [--prompt 1900] [--decode 150] [--json]

Small preset, 2 stages as Ray actors. `--seqs` sequences of a `--prompt`-token prompt decode
together; once each has generated `--decode` tokens (about 2K in its state), the last stage's
process is SIGKILLed. Measured until every sequence has recomputed all it had before the kill:
the replacement's start-up, the replay, and the tokens the healthy first stage re-ran (its
prefill-token counter). Same workload, `recovery_snapshots` on vs off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import time

import torch
from throughput import prompts, small_checkpoint


def one_run(path, snapshots: bool, seqs: int, prompt: int, decode: int) -> dict:
    from jamba_ray.engine.llm import LLM
    from jamba_ray.engine.sampling_params import SamplingParams

    core = LLM(
        str(path),
        num_stages=2,
        max_num_seqs=seqs,
        max_model_len=prompt + decode + 64,
        max_batched_tokens=2048,
        state_memory_gib=4.0,
        recovery_snapshots=snapshots,
    ).engine
    try:
        params = SamplingParams(max_tokens=decode + 32, temperature=0, ignore_eos=True)
        for i, p in enumerate(prompts(seqs, prompt, core.spec.vocab_size, seed=7)):
            core.add_request(f"r{i}", p, params, lambda out: None)
        running = core.scheduler.running
        while len(running) < seqs or min(len(s.output_ids) for s in running) < decode:
            core.step()
        # what each sequence had computed (or had in flight) when its stage died
        reached = {s.seq_id: s.length - 1 for s in running}
        before = core.pipeline.stats()[0]["prefill_tokens"]
        replace, timed = core.pipeline.replace, {}

        def timed_replace(indices, trusted=None):
            t = time.perf_counter()
            try:
                return replace(indices, trusted)
            finally:
                timed["replace_s"] = time.perf_counter() - t

        core.pipeline.replace = timed_replace
        t0 = time.perf_counter()
        os.kill(core.pipeline.stats()[1]["pid"], signal.SIGKILL)
        while not timed or any(
            s.seq_id in reached and s.num_computed < reached[s.seq_id]
            for s in [*core.scheduler.running, *core.scheduler.waiting]
        ):
            core.step()
        total = time.perf_counter() - t0
        replayed = core.pipeline.stats()[0]["prefill_tokens"] - before
        return {
            "snapshots": snapshots,
            "sequences": seqs,
            "tokens_at_kill": round(sum(reached.values()) / len(reached)),
            "replayed_tokens": replayed,
            "replace_s": timed["replace_s"],
            "recovery_s": total,
            "replay_s": total - timed["replace_s"],
            "restarts": core.counters["stage_restarts"],
        }
    finally:
        core.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1900)
    ap.add_argument("--decode", type=int, default=150)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    path = small_checkpoint()
    rows = [one_run(path, snap, a.seqs, a.prompt, a.decode) for snap in (False, True)]
    ray.shutdown()
    if a.json:
        print(json.dumps(rows))
        return
    print(
        f"stage recovery, small preset, 2 stages, {a.seqs} sequences at ~"
        f"{rows[0]['tokens_at_kill']} tokens, last stage SIGKILLed; {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, CPU fp32\n"
    )
    print("| recovery | tokens replayed | replacement start-up s | replay s | total s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        name = "snapshots (replay since the last)" if r["snapshots"] else "full replay"
        print(
            f"| {name} | {r['replayed_tokens']} | {r['replace_s']:.1f} | {r['replay_s']:.1f} | "
            f"{r['recovery_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
