"""One-shot GPU check (NVIDIA): per kernel op, which implementation runs (flash-attn, causal-conv1d,
mamba-ssm, our Triton kernels or torch), each one's self-check and its time beside the others;
CUDA parity with HF on the tiny model, each Triton kernel's time and achieved bandwidth at
Jamba-v0.1 shapes, a Jamba-v0.1-sized stage decoding (batch 1/8/64/256, bf16
and int8, eager and as CUDA graphs) and prefilling (2K, 32K) beside transformers on the same GPU,
and the stage-to-stage hop cost through the host vs on device (NCCL between GPUs:
`benchmarks/hop.py --device cuda`, 2 GPUs). Writes JSON and a markdown table.

    python benchmarks/gpu_check.py [--out DIR] [--cpu-smoke]

Without --out the results go to $OUT (else benchmarks/results) as <date>-gpu_check-<card>.json
and .md. Needs torch with CUDA and transformers; not Ray (stages run in-process). Each section
that fails records its error in the results and the run goes on. --cpu-smoke runs every section
tiny on the CPU (the Triton kernels under the interpreter) to test the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pickle
import re
import sys
import tempfile
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # Triton reads this once, when first imported (torch may import it)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import gpu_kernel_choice, gpu_kernels, gpu_stage  # noqa: E402
from benchmarks.gpu_render import render  # noqa: E402
from benchmarks.gpu_util import empty_cache, guarded, timed  # noqa: E402
from jamba_ray.engine.messages import Segment, StepMessage  # noqa: E402
from jamba_ray.model import kernels  # noqa: E402
from jamba_ray.model.kernels import packages, selfcheck  # noqa: E402
from jamba_ray.runtime.stage import Stage  # noqa: E402
from jamba_ray.runtime.stage_spec import StageSpec  # noqa: E402

PROMPTS = [[1, 5, 9, 200, 3, 77, 12], [1, 44, 8], [1] + list(range(300, 330))]
BOUNDS = [(0, 3), (3, 6)]
BLOCK, MAX_LEN, SLOTS = 16, 128, 4
DEV = "cuda"  # --cpu-smoke runs every step on the CPU with small shapes, to test this script


def tiny_checkpoint() -> Path:
    """The tiny preset, written once per machine."""
    from jamba_ray.tiny import TinySpec, init_tiny

    path = Path(tempfile.gettempdir()) / "jr-gpu-tiny"
    if not (path / "config.json").exists():
        init_tiny(path, TinySpec())
    return path


def table(slot: int, end: int) -> tuple[int, ...]:
    """Each slot owns a fixed run of KV blocks; the last block of the pool is the scratch one."""
    per = -(-MAX_LEN // BLOCK)
    return tuple(range(slot * per, slot * per + -(-end // BLOCK)))


def seg(seq_id: int, slot: int, start: int, length: int, logits="last") -> Segment:
    """A segment carrying its sequence's whole block table."""
    return Segment(seq_id, slot, start, length, logits, blocks=table(slot, start + length))


def stages(dtype: str, bounds=BOUNDS, **kw) -> list[Stage]:
    blocks = SLOTS * -(-MAX_LEN // BLOCK) + 1
    return [
        Stage(
            StageSpec(
                str(tiny_checkpoint()),
                i,
                a,
                b,
                len(bounds),
                SLOTS,
                MAX_LEN,
                blocks=blocks,
                block_size=BLOCK,
                dtype=dtype,
                device=DEV,
                **kw,
            )
        )
        for i, (a, b) in enumerate(bounds)
    ]


def last_logits(pipe: list[Stage], msg: StepMessage, tokens) -> torch.Tensor:
    """The last stage's raw logits [rows, vocab], fp32 on the CPU."""
    msg = dataclasses.replace(msg, return_logits=True)
    x = torch.as_tensor(tokens)
    for s in pipe:
        x = s.forward(msg, x)
    return torch.from_numpy(x.logits)


def parity(dtype: str) -> dict:
    """Greedy tokens and logits of 2 stages vs HF JambaForCausalLM on the same device (tiny)."""
    from transformers import JambaForCausalLM

    path, tdtype = tiny_checkpoint(), getattr(torch, dtype)
    ref = JambaForCausalLM.from_pretrained(path, dtype=tdtype).to(DEV).eval()
    ref32 = ref if dtype == "float32" else JambaForCausalLM.from_pretrained(path).to(DEV).eval()
    pipe = stages(dtype)
    same, worst, ours32, hf32 = 0, 0.0, 0.0, 0.0  # the last two: distance to fp32
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        x, msg = torch.tensor(seq), StepMessage(0, (seg(i, i, 0, len(seq)),))
        agree = []
        for step in range(12):
            h = last_logits(pipe, msg, x)[0].to(DEV)
            with torch.no_grad():
                want = ref(torch.tensor([seq], device=DEV)).logits[0, -1].float()
                exact = ref32(torch.tensor([seq], device=DEV)).logits[0, -1]
            worst = max(worst, float((h - want).abs().max()))
            ours32 = max(ours32, float((h - exact).abs().max()))
            hf32 = max(hf32, float((want - exact).abs().max()))
            tok = int(h.argmax())
            agree.append(tok == int(want.argmax()))
            seq.append(tok)
            x, msg = torch.tensor([tok]), StepMessage(step + 1, (seg(i, i, len(seq) - 1, 1),))
        same += all(agree)
    return {
        "prompts_token_exact": f"{same}/{len(PROMPTS)}",
        "max_logit_diff": worst,
        "ours_vs_fp32": ours32,
        "hf_vs_fp32": hf32,
    }


def graph_parity() -> dict:
    """Fixed-shape (CUDA-graph) decode vs eager on the tiny model in bf16, teacher-forced."""
    eager, fixed = stages("bfloat16"), stages("bfloat16", decode_graphs=True)
    segs = tuple(seg(i, i, 0, len(p)) for i, p in enumerate(PROMPTS))
    flat = [t for p in PROMPTS for t in p]
    want = last_logits(eager, StepMessage(0, segs), flat)
    last_logits(fixed, StepMessage(0, segs), flat)
    lengths, worst, agree, total = [len(p) for p in PROMPTS], 0.0, 0, 0
    for step in range(1, 13):
        toks = [int(r.argmax()) for r in want]
        msg = StepMessage(step, tuple(seg(i, i, lengths[i], 1) for i in range(len(PROMPTS))))
        lengths = [n + 1 for n in lengths]
        want, got = last_logits(eager, msg, toks), last_logits(fixed, msg, toks)
        worst = max(worst, float((got - want).abs().max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(PROMPTS)
    st = fixed[0].stats()
    keys = ("decode_graph_steps", "decode_graphs_captured", "decode_graphs_disabled")
    return {
        "max_logit_diff": worst,
        "argmax_agree": f"{agree}/{total}",
        **{k: st[k] for k in keys},
    }


def sampler_check() -> dict:
    """The sampler on device logits: greedy + penalties as on the CPU, seeded draws repeat."""
    from jamba_ray.engine.sampling_params import SamplingParams
    from jamba_ray.model.sampler import RowInput, sample

    logits = torch.randn(4, 65536, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(
        temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, logprobs=2
    )
    greedy = [RowInput(params, 1, 0, [1, 2, 3], [int(logits[i].argmax())]) for i in range(4)]
    cpu, dev = sample(logits, greedy, None), sample(logits.to(DEV), greedy, None)
    seeded = [
        RowInput(SamplingParams(temperature=0.8, top_p=0.9, seed=7), 7, i, [], []) for i in range(4)
    ]
    a, b = sample(logits.to(DEV), seeded, None), sample(logits.to(DEV), seeded, None)
    return {
        "greedy_equal": [o.token for o in cpu] == [o.token for o in dev],
        "logprob_diff": max(abs(x.logprob - y.logprob) for x, y in zip(cpu, dev)),
        "seeded_reproducible": [o.token for o in a] == [o.token for o in b],
    }


def int8_quality() -> dict:
    """int8 vs bf16 on the tiny model: logit and log-likelihood deltas on a 31-token prompt."""
    prompt = PROMPTS[2]
    msg = StepMessage(0, (seg(0, 0, 0, len(prompt), logits="all"),))
    outs = {}
    for q in (None, "int8"):
        outs[q] = last_logits(stages("bfloat16", [(0, 6)], quantization=q), msg, prompt)
    lp = {q: torch.log_softmax(v, -1) for q, v in outs.items()}
    ll = {q: sum(float(v[i - 1, prompt[i]]) for i in range(1, len(prompt))) for q, v in lp.items()}
    return {
        "tiny_max_logit_delta": float((outs[None] - outs["int8"]).abs().max()),
        "tiny_loglik_bf16": ll[None],
        "tiny_loglik_int8": ll["int8"],
    }


def copy_bandwidth() -> float:
    a = torch.empty(2**30 if DEV == "cuda" else 2**26, dtype=torch.uint8, device=DEV)
    return 2 * a.numel() / timed(a.clone, DEV, iters=10) / 1e9


def hop_cost(hidden: int = 4096) -> dict:
    """Hidden states between stages: through the host (what the object store does) vs on device."""
    res = {}
    for rows in (1, 64, 2048):
        x = torch.randn(rows, hidden, device=DEV, dtype=torch.bfloat16)

        def host(x=x):
            return pickle.loads(pickle.dumps(x.cpu())).to(DEV)

        res[rows] = {
            "host_ms": timed(host, DEV, iters=10) * 1e3,
            "device_ms": timed(x.clone, DEV, iters=10) * 1e3,
        }
    return res


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run(smoke: bool) -> dict:
    t0 = time.time()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (smoke run)"
    r = {
        "device": name,
        "device_kind": "CUDA" if DEV == "cuda" else "CPU",
        "torch": torch.__version__,
        "triton_kernels": kernels.available(),
        "packages": packages.installed(),
    }
    # first: each kernel's self-check and choice, before the sections that use them
    r["kernel_choice"] = guarded(gpu_kernel_choice.kernel_choice, DEV, smoke)
    r["parity_fp32"] = guarded(parity, "float32")
    r["parity_bf16"] = guarded(parity, "bfloat16")
    r["graph_parity"] = guarded(graph_parity)
    r["sampler"] = guarded(sampler_check)
    r["int8_quality"] = guarded(int8_quality)
    r["copy_gbps"] = guarded(copy_bandwidth)
    r["kernels"] = guarded(gpu_kernels.kernel_checks, DEV, smoke)
    empty_cache(DEV)
    batches = (1, 8, 64) if smoke else (1, 8, 64, 256)
    lengths = (128, 512) if smoke else (2048, 32768)
    budget = 60 if smoke else 600  # seconds one prefill length may take, all its runs together
    stage = guarded(gpu_stage.ours, DEV, smoke, batches, lengths, budget)
    r.update(stage if "error" not in stage else {"jamba_stage": stage})
    r["transformers_stage"] = guarded(
        gpu_stage.transformers_stage, DEV, smoke, batches, lengths, budget
    )
    r["hop"] = guarded(hop_cost)
    r["kernel_fallbacks"] = selfcheck.stats()["kernel_fallbacks"]  # incl. calls that raised
    r["wall_s"] = time.time() - t0
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", help="directory for gpu_check.json/.md (default: see above)")
    ap.add_argument("--cpu-smoke", action="store_true", help="small, on the CPU: tests the script")
    a = ap.parse_args()
    global DEV
    DEV = "cpu" if a.cpu_smoke else "cuda"
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    r = run(a.cpu_smoke)
    if a.out:
        out, stem = Path(a.out), "gpu_check"
    else:  # $OUT: what a device machine hands back
        out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
        stem = f"{datetime.date.today().isoformat()}-gpu_check-{card_slug(r['device'])}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(r, indent=1, default=str))
    table_md = render(r)
    (out / f"{stem}.md").write_text(table_md + "\n")
    print(table_md)


if __name__ == "__main__":
    main()
