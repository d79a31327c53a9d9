"""Prefill of one long prompt on the CPU: what users run, the lab path and transformers.

    python benchmarks/prefill.py [--tokens 8192] [--repeats 3] [--threads CORES] [--json]

Builds the `small` preset (max_position_embeddings raised to 16384) in a temp dir, then times in
one run, interleaved round by round: (a) HF `JambaForCausalLM` forward on the whole prompt (fp32,
no cache, last-position logits only); (b) the served default: `LLM(path, num_stages=2)` on Ray
stage actors with every option at its default (only `max_model_len` raised to fit the prompt),
time to the first token of a prompt it has not seen (prefix caching on, nothing to reuse); (c)
our layers as two in-process stages [0, 4) and [4, 8), fed 2048-token micro-batches (later ones
continue from the slot's state), with the sequential reference scan; (d) the same with the chunked
scan `ssm_scan` runs. Every path is warmed up once; the table shows the median of the runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from jamba_ray.engine.messages import Segment, StepMessage  # noqa: E402
from jamba_ray.model import mamba  # noqa: E402
from jamba_ray.model.scan import CHUNK, scan_reference  # noqa: E402
from jamba_ray.model.slice import SliceModel  # noqa: E402
from jamba_ray.model.state_pool import StatePool  # noqa: E402

MICRO_BATCH = 2048  # prompt tokens per micro-batch, as the engine chunks a long prefill
SPLIT = ((0, 4), (4, 8))  # two stages over the small preset's 8 layers
BLOCK = 16  # KV block size


def build_checkpoint(root: Path, tokens: int) -> Path:
    from jamba_ray.tiny import TinySpec, init_tiny

    long = (("max_position_embeddings", max(16384, tokens)),)
    return init_tiny(root / "small", TinySpec(preset="small", max_shard_size="2GB", overrides=long))


def our_stages(hf, tokens: int) -> list[tuple[SliceModel, StatePool]]:
    """Both slices, with the HF model's weights (same parameter names) and a 1-slot pool each."""
    config = copy.deepcopy(hf.config)
    config._experts_implementation = "eager"  # as model/loader.py loads a slice
    weights = hf.state_dict()
    stages = []
    for i, (start, end) in enumerate(SPLIT):
        model = SliceModel(config, start, end, first=i == 0, last=i == len(SPLIT) - 1)
        model.load_state_dict({k: weights[k] for k in model.state_dict()}, strict=True)
        stages.append((model.eval(), make_pool(model, config, tokens)))
    return stages


def make_pool(model: SliceModel, config, tokens: int) -> StatePool:
    blocks = -(-tokens // BLOCK)
    sizes = SimpleNamespace(slots=1, blocks=blocks, block_size=BLOCK, checkpoints=0, max_len=tokens)
    return StatePool(model.pool_shape(config, sizes), torch.float32)


def run_slice(model: SliceModel, msg, x: torch.Tensor, pool: StatePool):
    return model(msg, x, pool, {1: list(range(pool.shape.blocks))})  # sequence 1 owns every block


def our_prefill(stages, ids: torch.Tensor) -> torch.Tensor:
    """The prompt through both stages, micro-batch by micro-batch: last-position logits [V]."""
    for _, pool in stages:
        pool.start(0)
    with torch.inference_mode():
        for step, lo in enumerate(range(0, len(ids), MICRO_BATCH)):
            n = min(MICRO_BATCH, len(ids) - lo)
            logits = "last" if lo + n == len(ids) else "none"
            msg = StepMessage(step, (Segment(1, 0, lo, n, logits=logits),))
            x = ids[lo : lo + n]
            for model, pool in stages:
                x = run_slice(model, msg, x, pool)
    return x[-1]


class Served:
    """`LLM(...)` with its defaults on 2 Ray stages: the first token of each prompt, greedy.
    Each call changes the prompt's first token so no prefix is reused; returns its last-position
    logprobs over the top 20 as a dense [V] vector (-inf elsewhere) to compare with HF's."""

    def __init__(self, path: Path, tokens: int):
        from jamba_ray import LLM

        self.llm = LLM(str(path), num_stages=2, max_model_len=tokens + 1)
        self.calls = 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        from jamba_ray import SamplingParams

        self.calls += 1
        prompt = [3 + self.calls, *ids[1:].tolist()]
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=20)
        (out,) = self.llm.generate([prompt], params)
        top = out.outputs[0].logprobs[0]  # {token: logprob}
        dense = torch.full((self.vocab,), float("-inf"))
        dense[list(top)] = torch.tensor(list(top.values()))
        return dense

    def config(self) -> dict:
        c = self.llm.config
        return {
            "max_batched_tokens": c.batched_tokens,
            "checkpoint_every": c.state.checkpoint_every,
            "threads_per_stage": self.llm.engine.pipeline.specs[0].threads,
            "transport": c.compute.transport,
        }


def hf_prefill(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None], use_cache=False, logits_to_keep=1).logits[0, -1]


@contextmanager
def reference_scan():
    """`ssm_scan` on the sequential reference (the loop it used to run), not the chunked scan."""

    def ssm_scan(u, dt, A, B, C, ssm, slot, emits=(), ckpt=None):
        assert not emits  # (this benchmark's micro-batches emit no checkpoint)
        y, ssm[slot] = scan_reference(u, dt, A, B, C, ssm[slot])
        return y

    saved, mamba.ssm_scan = mamba.ssm_scan, ssm_scan
    try:
        yield
    finally:
        mamba.ssm_scan = saved


def measure(runs: dict, ids: torch.Tensor, repeats: int) -> dict:
    """Warm each run up on one micro-batch, then time `repeats` interleaved rounds of all runs."""
    for fn, scope in runs.values():
        with scope():
            fn(ids[:MICRO_BATCH])
    times = {name: [] for name in runs}
    last = {}
    for r in range(repeats):
        for name, (fn, scope) in runs.items():
            with scope():
                t0 = time.perf_counter()
                last[name] = fn(ids)
                times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{repeats}: {name} {times[name][-1]:.2f} s", file=sys.stderr)
    ref = last["HF forward"]
    return {
        name: {
            "seconds": statistics.median(ts),
            "runs": ts,
            "logits_max_abs_diff_vs_hf": diff_vs_hf(last[name], ref),
        }
        for name, ts in times.items()
    }


def diff_vs_hf(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |Δ| of last-position logits; of logprobs where `ours` has only some (the served run's
    top 20; -inf elsewhere): a different prompt's first token there, so only same-shape sanity."""
    finite = torch.isfinite(ours)
    if bool(finite.all()):
        return float((ours - ref).abs().max())
    return float("nan")


def table(r: dict) -> str:
    base = r["results"]["HF forward"]["seconds"]
    lines = [
        f"prefill of a {r['tokens']}-token prompt, small preset, {r['machine']}",
        f"served defaults: {r['served_config']}",
        "",
        "| run | seconds (median) | runs (s) | tokens/s | vs HF | max abs Δ logits vs HF |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, x in r["results"].items():
        runs = " / ".join(f"{t:.2f}" for t in x["runs"])
        tps, speed = r["tokens"] / x["seconds"], base / x["seconds"]
        diff = x["logits_max_abs_diff_vs_hf"]
        diff = "—" if diff != diff else f"{diff:.1e}"  # NaN: not comparable (see diff_vs_hf)
        lines.append(
            f"| {name} | {x['seconds']:.2f} | {runs} | {tps:.0f} | {speed:.2f}x | {diff} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from transformers import JambaForCausalLM

    torch.set_num_threads(a.threads)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp), a.tokens)
        hf = JambaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        served = Served(path, a.tokens)  # (loads its stages before the directory goes)
    stages = our_stages(hf, a.tokens)
    vocab = served.vocab = hf.config.vocab_size
    ids = torch.randint(3, vocab, (a.tokens,), generator=torch.Generator().manual_seed(0))
    runs = {
        "HF forward": (lambda x: hf_prefill(hf, x), nullcontext),
        "served default: LLM(...) on 2 Ray stages, TTFT": (served, nullcontext),
        "ours, sequential scan": (lambda x: our_prefill(stages, x), reference_scan),
        "ours, chunked scan": (lambda x: our_prefill(stages, x), nullcontext),
    }
    r = {
        "tokens": a.tokens,
        "micro_batch": MICRO_BATCH,
        "scan_chunk": CHUNK,
        "stages": [list(s) for s in SPLIT],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, CPU fp32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "served_config": served.config(),
        "results": measure(runs, ids, a.repeats),
    }
    served.llm.shutdown()
    print(json.dumps(r, indent=1) if a.json else table(r))


if __name__ == "__main__":
    main()
