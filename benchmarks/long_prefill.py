"""A long prompt's prefill: wall time to its first token, micro-batches, and prefix reuse.

    python benchmarks/long_prefill.py [--preset small] [--length 4096] [--stages 1] [--json]

One prompt of `--length` tokens, alone, on in-process stages (`backend: local`), defaults
otherwise (`max_batched_tokens` 512, `checkpoint_every` 256, `block_size` 16): seconds to its first
token and the micro-batches its prefill took; then the same prompt again (its cached tokens and
time to first token), and three prompts sharing a 300-token prefix (cached tokens of each).
Run it with PYTHONPATH at two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import json
import time

from throughput import prompts, small_checkpoint


def first_token(llm, prompt: list[int]) -> dict:
    from jamba_ray.engine.sampling_params import SamplingParams

    eng, t0, got, steps = llm.engine, time.perf_counter(), [], 0
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    eng.add_request(f"p{time.monotonic_ns()}", prompt, params, lambda out: got.append(out))
    while not any(o.outputs and o.outputs[0].token_ids for o in got):
        eng.step()
        steps += 1
    s = time.perf_counter() - t0
    while eng.has_work():
        eng.step()
    return {"ttft_s": round(s, 3), "micro_batches": steps, "cached": got[-1].num_cached_tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from jamba_ray.engine.llm import LLM
    from jamba_ray.tiny import default_tiny_dir

    path = small_checkpoint() if a.preset == "small" else default_tiny_dir()
    vocab = 4096 if a.preset == "small" else 512
    kw = dict(num_stages=a.stages, backend="local", max_num_seqs=4, max_model_len=a.length + 64)
    llm = LLM(str(path), state_memory_gib=1.0, **kw)
    llm.generate([prompts(1, 64, vocab, seed=9)[0]])  # warm-up: first calls allocate
    (long,) = prompts(1, a.length, vocab, seed=1)
    shared = prompts(1, 300, vocab, seed=2)[0]
    out = {"preset": a.preset, "length": a.length, "stages": a.stages}
    out["cold"] = first_token(llm, long)
    out["repeat"] = first_token(llm, long)
    out["shared_300"] = [first_token(llm, shared + [5 + i, 6 + i])["cached"] for i in range(3)]
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
