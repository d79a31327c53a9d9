"""Prefill of one long prompt on the CPU: transformers' forward vs our stages' two scans.

    python benchmarks/prefill.py [--tokens 8192] [--repeats 3] [--threads CORES] [--json]

Builds the `small` preset (max_position_embeddings raised to 16384) in a temp dir, then times in
one run, interleaved round by round: (a) HF `JambaForCausalLM` forward on the whole prompt (fp32,
no cache, last-position logits only); (b) our layers as two in-process stages [0, 4) and [4, 8),
fed 2048-token micro-batches as the engine chunks a prompt (later ones continue from the slot's
state), with the sequential reference scan; (c) the same with the chunked scan `ssm_scan` runs.
Every path is warmed up once on the first micro-batch; the table shows the median of the runs.
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


def hf_prefill(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None], use_cache=False, logits_to_keep=1).logits[0, -1]


@contextmanager
def reference_scan():
    """`ssm_scan` on the sequential reference (the loop it used to run), not the chunked scan."""

    def ssm_scan(u, dt, A, B, C, ssm, slot):
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
            "logits_max_abs_diff_vs_hf": float((last[name] - ref).abs().max()),
        }
        for name, ts in times.items()
    }


def table(r: dict) -> str:
    base = r["results"]["HF forward"]["seconds"]
    lines = [
        f"prefill of a {r['tokens']}-token prompt, small preset, {r['machine']}",
        "",
        "| run | seconds (median) | runs (s) | tokens/s | vs HF | max abs Δ logits vs HF |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, x in r["results"].items():
        runs = " / ".join(f"{t:.2f}" for t in x["runs"])
        tps, speed = r["tokens"] / x["seconds"], base / x["seconds"]
        diff = x["logits_max_abs_diff_vs_hf"]
        lines.append(
            f"| {name} | {x['seconds']:.2f} | {runs} | {tps:.0f} | {speed:.2f}x | {diff:.1e} |"
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
    stages = our_stages(hf, a.tokens)
    vocab = hf.config.vocab_size
    ids = torch.randint(3, vocab, (a.tokens,), generator=torch.Generator().manual_seed(0))
    runs = {
        "HF forward": (lambda x: hf_prefill(hf, x), nullcontext),
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
        "results": measure(runs, ids, a.repeats),
    }
    print(json.dumps(r, indent=1) if a.json else table(r))


if __name__ == "__main__":
    main()
