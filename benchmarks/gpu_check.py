"""One-shot GPU check (NVIDIA): CUDA parity with HF, a Jamba-v0.1-sized stage's decode step
(eager and as CUDA graphs), achieved memory bandwidth, int8 on GPU, and the stage-to-stage hop cost
through the host vs on device (NCCL between GPUs: `benchmarks/hop.py --device cuda`, 2 GPUs).
Prints one table.

    python benchmarks/gpu_check.py [--out DIR]

Needs torch with CUDA and transformers; not Ray. Finishes in a few minutes on an H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jamba_ray.engine.messages import Segment, StepMessage  # noqa: E402
from jamba_ray.model.decode_graphs import DecodeGraphs  # noqa: E402
from jamba_ray.model.device import decode_kernels  # noqa: E402
from jamba_ray.model.quant import quantize_slice  # noqa: E402
from jamba_ray.model.slice import SliceModel  # noqa: E402
from jamba_ray.model.state_pool import StatePool  # noqa: E402
from jamba_ray.runtime.stage import Stage, StageSpec  # noqa: E402

PROMPTS = [[1, 5, 9, 200, 3, 77, 12], [1, 44, 8], [1] + list(range(300, 330))]
DEV = "cuda"  # --cpu-smoke runs every step on the CPU with a small stage, to test this script


def device_label() -> str:
    """What the table's rows name as the device the checks ran on."""
    return "CUDA" if DEV == "cuda" else "CPU"


def cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if DEV == "cpu":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def tiny_checkpoint() -> Path:
    """The tiny preset, written once per machine."""
    from jamba_ray.tiny import TinySpec, init_tiny

    path = Path(tempfile.gettempdir()) / "jr-gpu-tiny"
    if not (path / "config.json").exists():
        init_tiny(path, TinySpec())
    return path


def last_logits(stages: list[Stage], msg: StepMessage, tokens) -> torch.Tensor:
    """Run in-process stages on one message; the last stage's raw logits [rows, vocab], fp32 on
    the CPU (the message asks for them: the last stage otherwise returns only what it sampled)."""
    msg = dataclasses.replace(msg, return_logits=True)
    x = torch.as_tensor(tokens)
    for s in stages:
        x = s.forward(msg, x)
    return torch.from_numpy(x.logits)


def parity(dtype: str) -> dict:
    """Greedy tokens and logits of 2 stages vs HF JambaForCausalLM, both on the check's device
    (tiny preset)."""
    from transformers import JambaForCausalLM

    path = tiny_checkpoint()
    tdtype = getattr(torch, dtype)
    ref = JambaForCausalLM.from_pretrained(path, dtype=tdtype).to(DEV).eval()
    ref32 = ref if dtype == "float32" else JambaForCausalLM.from_pretrained(path).to(DEV).eval()
    stages = [
        Stage(StageSpec(str(path), i, a, b, 2, 4, 128, dtype, DEV))
        for i, (a, b) in enumerate([(0, 3), (3, 6)])
    ]
    same, worst, ours32, hf32 = 0, 0.0, 0.0, 0.0  # the last two: distance to fp32 on our sequences
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        x = torch.tensor(seq)
        msg = StepMessage(0, (Segment(i, i, 0, len(seq)),))
        ours = []
        for step in range(12):
            h = last_logits(stages, msg, x)
            with torch.no_grad():
                want = ref(torch.tensor([seq], device=DEV)).logits[0, -1].float()
                exact = ref32(torch.tensor([seq], device=DEV)).logits[0, -1]
            worst = max(worst, float((h[0].to(DEV) - want).abs().max()))
            ours32 = max(ours32, float((h[0].to(DEV) - exact).abs().max()))
            hf32 = max(hf32, float((want - exact).abs().max()))
            tok = int(h[0].argmax())
            ours.append(tok == int(want.argmax()))
            seq.append(tok)
            x, msg = torch.tensor([tok]), StepMessage(step + 1, (Segment(i, i, len(seq) - 1, 1),))
        same += all(ours)
    return {
        "prompts_token_exact": f"{same}/{len(PROMPTS)}",
        "max_logit_diff": worst,
        "ours_vs_fp32": ours32,
        "hf_vs_fp32": hf32,
    }


def sampler_check() -> dict:
    """The sampler on device logits (as the last stage samples): greedy + penalties as on the CPU,
    seeded draws reproducible on the device."""
    from jamba_ray.engine.sampling_params import SamplingParams
    from jamba_ray.model.sampler import RowInput, sample

    logits = torch.randn(4, 65536, generator=torch.Generator().manual_seed(0))
    greedy = [
        RowInput(
            SamplingParams(
                temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, logprobs=2
            ),
            1,
            0,
            [1, 2, 3],
            [int(logits[i].argmax())],
        )
        for i in range(4)
    ]
    cpu = sample(logits, greedy, None)
    dev = sample(logits.to(DEV), greedy, None)
    seeded = [
        RowInput(SamplingParams(temperature=0.8, top_p=0.9, seed=7), 7, i, [], []) for i in range(4)
    ]
    a, b = sample(logits.to(DEV), seeded, None), sample(logits.to(DEV), seeded, None)
    return {
        "greedy_equal": [o.token for o in cpu] == [o.token for o in dev],
        "logprob_diff": max(abs(x.logprob - y.logprob) for x, y in zip(cpu, dev)),
        "seeded_reproducible": [o.token for o in a] == [o.token for o in b],
    }


def graph_parity() -> dict:
    """decode_graphs vs eager stages on the tiny model in bf16, teacher-forced on eager's tokens."""
    path = tiny_checkpoint()

    def build(graphs):
        return [
            Stage(StageSpec(str(path), i, a, b, 2, 4, 128, "bfloat16", DEV, decode_graphs=graphs))
            for i, (a, b) in enumerate([(0, 3), (3, 6)])
        ]

    eager, fixed = build(False), build(True)
    segs = tuple(Segment(i, i, 0, len(p)) for i, p in enumerate(PROMPTS))
    flat = [t for p in PROMPTS for t in p]
    want = last_logits(eager, StepMessage(0, segs), flat)
    last_logits(fixed, StepMessage(0, segs), flat)
    lengths, worst, agree, total = [len(p) for p in PROMPTS], 0.0, 0, 0
    for step in range(1, 13):
        toks = [int(r.argmax()) for r in want]
        msg = StepMessage(step, tuple(Segment(i, i, lengths[i], 1) for i in range(len(PROMPTS))))
        lengths = [n + 1 for n in lengths]
        want, got = last_logits(eager, msg, toks), last_logits(fixed, msg, toks)
        worst = max(worst, float((got - want).abs().max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(PROMPTS)
    st = fixed[0].stats()
    return {
        "max_logit_diff": worst,
        "argmax_agree": f"{agree}/{total}",
        **{
            k: st[k]
            for k in ("decode_graph_steps", "decode_graphs_captured", "decode_graphs_disabled")
        },
    }


def jamba_stage_config():
    """One stage of a 4-stage Jamba-v0.1: layers 0-7 = 1 attention, 3 Mamba/MLP, 4 Mamba/MoE."""
    from transformers import JambaConfig

    small = (
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_experts=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1024,
            mamba_dt_rank=16,
        )
        if DEV == "cpu"
        else {}
    )
    cfg = JambaConfig(num_hidden_layers=8, **small)  # Jamba-v0.1 sizes are the defaults
    cfg._experts_implementation = "eager"
    return cfg


def build_stage(cfg, dtype=torch.bfloat16) -> SliceModel:
    with torch.device("meta"):
        model = SliceModel(cfg, 0, 8, first=False, last=False)
    model = model.to_empty(device=DEV).to(dtype)
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.data.copy_(
                torch.log(
                    torch.arange(1, p.shape[1] + 1, device=DEV, dtype=torch.float32)
                ).expand_as(p)
            )
        elif name.endswith(("norm.weight", ".D", "layernorm.weight")):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0, 0.02, generator=gen)
    for name, p in model.named_parameters():
        if name.endswith(("A_log", ".D")):
            p.data = p.data.float()
    return model.eval()


def stage_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def decode_timing(model, cfg, batches=(1, 8, 64), max_len=2048) -> dict:
    shape = model.pool_shape(cfg, max(batches), max_len)
    pool = StatePool(shape, torch.bfloat16, DEV)
    h = cfg.hidden_size
    with torch.inference_mode():
        prefill = StepMessage(0, tuple(Segment(i, i, 0, 16) for i in range(max(batches))))
        model(prefill, torch.randn(16 * max(batches), h, device=DEV, dtype=torch.bfloat16), pool)
    experts = [m for n, m in model.named_modules() if n.endswith("feed_forward.experts")]
    all_experts = sum(stage_bytes(m) for m in experts)  # bf16 or int8 (+ scales), as resident
    moe_layers = len(experts)
    expert = all_experts / (moe_layers * cfg.num_experts)
    out = {}
    for b in batches:
        msg = StepMessage(1, tuple(Segment(i, i, 16, 1) for i in range(b)))
        x = torch.randn(b, h, device=DEV, dtype=torch.bfloat16)

        def step(msg=msg, x=x):
            with torch.inference_mode():
                model(msg, x, pool)

        t = cuda_time(step)
        hit = cfg.num_experts * (1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** b)
        weights = stage_bytes(model) - all_experts + moe_layers * hit * expert
        state = b * 2 * (pool.conv[:, 0].numel() * 2 + pool.ssm[:, 0].numel() * 4)
        kv = b * 2 * pool.k[:, 0, :, :17].numel() * 2
        out[b] = {"step_ms": t * 1e3, "tok_s": b / t, "gbps": (weights + state + kv) / t / 1e9}
    return out


def copy_bandwidth() -> float:
    a = torch.empty(2**30 if DEV == "cuda" else 2**26, dtype=torch.uint8, device=DEV)
    t = cuda_time(lambda: a.clone(), iters=10)
    return 2 * a.numel() / t / 1e9


def hop_cost(hidden: int = 4096) -> dict:
    """Hidden states between stages: through the host (what the object store does) vs on device."""
    res = {}
    for rows in (1, 64, 2048):
        x = torch.randn(rows, hidden, device=DEV, dtype=torch.bfloat16)

        def host(x=x):
            y = pickle.loads(pickle.dumps(x.cpu()))
            return y.to(DEV)

        host_t = cuda_time(host, iters=10)
        dev_t = cuda_time(x.clone, iters=10)
        res[rows] = {"host_ms": host_t * 1e3, "device_ms": dev_t * 1e3}
    return res


def int8_check(cfg) -> dict:
    """int8 vs bf16 on the tiny model (logit / loglik deltas) and on the Jamba-sized stage
    (memory, speed)."""
    path = tiny_checkpoint()
    prompt = PROMPTS[2]
    msg = StepMessage(0, (Segment(0, 0, 0, len(prompt), logits="all"),))
    outs = {}
    for q in (None, "int8"):
        st = Stage(StageSpec(str(path), 0, 0, 6, 1, 2, 64, "bfloat16", DEV, quantization=q))
        outs[q] = last_logits([st], msg, prompt)
    lp = {q: torch.log_softmax(v, -1) for q, v in outs.items()}
    ll = {q: sum(float(v[i - 1, prompt[i]]) for i in range(1, len(prompt))) for q, v in lp.items()}
    return {
        "tiny_max_logit_delta": float((outs[None] - outs["int8"]).abs().max()),
        "tiny_loglik_bf16": ll[None],
        "tiny_loglik_int8": ll["int8"],
    }


def graph_timing(model, cfg, batches=(1, 8, 64), max_len=2048) -> dict:
    """The same decode steps through DecodeGraphs (one CUDA graph per batch), checked against
    eager."""
    shape = model.pool_shape(cfg, max(batches) + 1, max_len)  # + the scratch slot for padding rows
    pool = StatePool(shape, torch.bfloat16, DEV)
    graphs = DecodeGraphs(
        model,
        pool,
        cfg,
        first=False,
        device=DEV,
        dtype=torch.bfloat16,
        scratch_slot=max(batches),
        max_batch=max(batches),
    )
    h = cfg.hidden_size
    with torch.inference_mode():
        prefill = StepMessage(0, tuple(Segment(i, i, 0, 16) for i in range(max(batches))))
        model(prefill, torch.randn(16 * max(batches), h, device=DEV, dtype=torch.bfloat16), pool)
    out = {}
    for b in batches:
        msg = StepMessage(1, tuple(Segment(i, i, 16, 1) for i in range(b)))
        x = torch.randn(b, h, device=DEV, dtype=torch.bfloat16)
        saved = (pool.conv.clone(), pool.ssm.clone())
        with torch.inference_mode():
            want = model(msg, x, pool)
            pool.conv.copy_(saved[0])
            pool.ssm.copy_(saved[1])
            got = graphs.run(msg, x)
            pool.conv.copy_(saved[0])
            pool.ssm.copy_(saved[1])
        if got is None:  # capture failed: the reason is in the stats row
            break

        def step(msg=msg, x=x):
            with torch.inference_mode():
                graphs.run(msg, x)

        t = cuda_time(step)
        out[b] = {
            "step_ms": t * 1e3,
            "tok_s": b / t,
            "max_diff_vs_eager": float((got - want).abs().max()),
        }
    out["stats"] = graphs.stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run on the CPU with a small stage (tests the script)",
    )
    a = ap.parse_args()
    global DEV
    DEV = "cpu" if a.cpu_smoke else "cuda"
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    t0 = time.time()
    r = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "CPU (smoke run)",
        "device_kind": device_label(),
        "torch": torch.__version__,
        "mamba_kernels": decode_kernels() is not None,
    }
    r["parity_fp32"] = parity("float32")
    r["parity_bf16"] = parity("bfloat16")
    r["graph_parity"] = graph_parity()
    r["sampler"] = sampler_check()
    r["copy_gbps"] = copy_bandwidth()
    cfg = jamba_stage_config()
    model = build_stage(cfg)
    r["stage_gib_bf16"] = stage_bytes(model) / 2**30
    r["decode_bf16"] = decode_timing(model, cfg)
    r["decode_graphs_bf16"] = graph_timing(model, cfg)
    _empty_cache()
    quantize_slice(model)
    _empty_cache()
    r["stage_gib_int8"] = stage_bytes(model) / 2**30
    r["decode_int8"] = decode_timing(model, cfg, batches=(1, 8))
    del model
    _empty_cache()
    r["int8_quality"] = int8_check(cfg)
    r["hop"] = hop_cost()
    r["wall_s"] = time.time() - t0
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gpu_check.json").write_text(json.dumps(r, indent=1))
    table = render(r)
    (Path(a.out) / "gpu_check.md").write_text(table + "\n")
    print(table)


def _empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def render(r: dict) -> str:
    on = r.get("device_kind", "CUDA")  # the device the checks ran on (older results: CUDA)
    p32, p16 = r["parity_fp32"], r["parity_bf16"]
    lines = [
        f"GPU check on {r['device']} (torch {r['torch']}; mamba-ssm/causal-conv1d kernels: "
        f"{'yes' if r['mamba_kernels'] else 'no, PyTorch path'}), {r['wall_s']:.0f} s",
        "",
        "| check | result |",
        "|---|---|",
        f"| parity vs HF on {on}, fp32 (tiny, 2 stages, 12 greedy steps) | tokens exact "
        f"{p32['prompts_token_exact']}, max logit diff {p32['max_logit_diff']:.2e} |",
        f"| parity vs HF on {on}, bf16 | tokens exact {p16['prompts_token_exact']}, max logit diff "
        f"{p16['max_logit_diff']:.2e}; distance to fp32: ours {p16['ours_vs_fp32']:.2e}, "
        f"HF bf16 {p16['hf_vs_fp32']:.2e} |",
        f"| device copy bandwidth (read+write) | {r['copy_gbps']:.0f} GB/s |",
        f"| Jamba-v0.1 stage (layers 0-7: 1 attn, 3 Mamba/MLP, 4 Mamba/MoE) weights | "
        f"bf16 {r['stage_gib_bf16']:.2f} GiB, int8 {r['stage_gib_int8']:.2f} GiB |",
    ]
    g = r["graph_parity"]
    lines.append(
        f"| decode_graphs vs eager, bf16 (tiny, 3 prompts x 12 teacher-forced steps) | "
        f"max logit diff {g['max_logit_diff']:.2e}, argmax agree {g['argmax_agree']}; graph steps "
        f"{g['decode_graph_steps']}, captured {g['decode_graphs_captured']}, off: "
        f"{g['decode_graphs_disabled']} |"
    )
    sm = r["sampler"]
    lines.append(
        f"| sampler on device logits (as on the last stage), vocab 65536 | "
        f"greedy + penalties equal to CPU: {sm['greedy_equal']} "
        f"(logprob diff {sm['logprob_diff']:.1e}), seeded draws reproducible: "
        f"{sm['seeded_reproducible']} |"
    )
    for kind in ("bf16", "int8"):
        for b, x in r[f"decode_{kind}"].items():
            lines.append(
                f"| decode step, {kind}, batch {b} | {x['step_ms']:.2f} ms, "
                f"{x['tok_s']:.0f} tok/s, {x['gbps']:.0f} GB/s achieved "
                f"({x['gbps'] / r['copy_gbps']:.0%} of copy bandwidth) |"
            )
        if kind == "bf16":
            g = r["decode_graphs_bf16"]
            for b, x in g.items():
                if b != "stats":
                    eager = r["decode_bf16"][b]["step_ms"]
                    lines.append(
                        f"| decode step, bf16, batch {b}, decode_graphs | {x['step_ms']:.2f} ms "
                        f"({eager / x['step_ms']:.2f}x eager), {x['tok_s']:.0f} tok/s, max diff vs "
                        f"eager {x['max_diff_vs_eager']:.2e} |"
                    )
            lines.append(f"| decode graphs | {g['stats']} |")
    q = r["int8_quality"]
    lines.append(
        f"| int8 vs bf16 (tiny, 31-token prompt) | "
        f"max logit delta {q['tiny_max_logit_delta']:.3f}, "
        f"loglik {q['tiny_loglik_bf16']:.3f} vs {q['tiny_loglik_int8']:.3f} |"
    )
    for rows, x in r["hop"].items():
        lines.append(
            f"| hop of [{rows}, 4096] bf16 hidden states | "
            f"via host (object-store path) {x['host_ms']:.3f} ms, "
            f"on device {x['device_ms']:.3f} ms |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
