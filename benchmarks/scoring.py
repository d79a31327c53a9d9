"""Scoring throughput (log-likelihood of texts): the jamba-ray pipeline vs HF forward passes.

    python benchmarks/scoring.py [--texts 32] [--length 128] [--stages 2] [--json]

Same `small` checkpoint for both. HF: one `JambaForCausalLM` forward per text in a plain loop.
jamba-ray: `LLM.score` (the engine path the Ray Data scoring actors run), and the whole Ray Data
job end to end (`jamba_ray.batch.run_job`, actor start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def texts(n: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(n)]


def hf_loop(path: Path, data: list[list[int]]) -> float:
    import torch
    from transformers import JambaForCausalLM

    model = JambaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        model(torch.tensor([data[0]]))
        t0 = time.perf_counter()
        for ids in data:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            logp.gather(1, x[0, 1:, None]).sum()
        return sum(map(len, data)) / (time.perf_counter() - t0)


def ours(path: Path, data: list[list[int]], stages: int) -> float:
    from jamba_ray import LLM

    llm = LLM(
        str(path),
        num_stages=stages,
        num_cpus_per_stage=1.0 / stages,
        threads_per_stage=os.cpu_count() or 1,
        max_num_seqs=32,
        max_batched_tokens=512,
        max_model_len=1024,
    )
    try:
        llm.score(data[:2])
        t0 = time.perf_counter()
        llm.score(data)
        return sum(map(len, data)) / (time.perf_counter() - t0)
    finally:
        llm.shutdown()


def job(path: Path, n: int, stages: int) -> tuple[float, float]:
    from jamba_ray.batch import ScoreConfig, run_job
    from jamba_ray.tiny import corpus_text

    lines = [ln for ln in corpus_text().splitlines() if ln.strip()]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.jsonl"
        src.write_text(
            "".join(json.dumps({"id": i, "text": lines[i % len(lines)]}) + "\n" for i in range(n))
        )
        cfg = ScoreConfig.build(
            str(path), num_stages=stages, num_cpus_per_stage=0.5, max_num_seqs=32
        )
        s = run_job(str(src), str(Path(d) / "out"), cfg, batch_size=16, progress=False)
    return s.tokens / s.wall_s, s.wall_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import ray

    from benchmarks.throughput import small_checkpoint

    path = small_checkpoint()
    data = texts(a.texts, a.length, 4096)
    r = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU fp32",
        "texts": a.texts,
        "length": a.length,
        "stages": a.stages,
        "hf_tok_s": hf_loop(path, data),
    }
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        r["ours_tok_s"] = ours(path, data, a.stages)
        r["job_tok_s"], r["job_wall_s"] = job(path, 4 * a.texts, a.stages)
    finally:
        ray.shutdown()
    if a.json:
        print(json.dumps(r, indent=1))
        return
    print(
        f"scoring, small preset, {a.texts} texts x {a.length} tokens, {a.stages} stages; "
        f"{r['machine']}\n"
    )
    print("| run | tokens/s | vs HF |\n|---|---:|---:|")
    print(f"| HF forward per text, plain loop | {r['hf_tok_s']:.0f} | 1.00x |")
    print(
        f"| jamba-ray LLM.score (engine, chunked prefill, continuous batching) | "
        f"{r['ours_tok_s']:.0f} | {r['ours_tok_s'] / r['hf_tok_s']:.2f}x |"
    )
    print(
        f"| jamba-ray Ray Data job end to end ({4 * a.texts} corpus rows, actor start-up included, "
        f"{r['job_wall_s']:.0f} s) | {r['job_tok_s']:.0f} | {r['job_tok_s'] / r['hf_tok_s']:.2f}x |"
    )


if __name__ == "__main__":
    main()
