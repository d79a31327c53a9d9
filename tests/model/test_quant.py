"""int8 weight-only quantization on CPU: less memory, small logit deltas, Mamba untouched."""

import torch

from jamba_ray.engine.messages import StepMessage
from jamba_ray.model.quant import Int8Linear, quantize_rows
from jamba_ray.runtime.stage import Stage
from tests.conftest import PROMPTS, seg, stage_logits, stage_spec


def stage(path, quantization=None, dtype="float32"):
    return Stage(
        stage_spec(path, 0, 0, 6, 1, slots=2, max_len=64, dtype=dtype, quantization=quantization)
    )


def logits(st, prompt):
    return stage_logits(
        [st], StepMessage(1, (seg(1, 0, 0, len(prompt), "all", max_len=64),)), prompt
    )


def test_row_quantization_round_trips_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert ((q.float() * scale[:, None]) - w).abs().max() <= scale.max() / 2 + 1e-6
    lin = torch.nn.Linear(32, 16, bias=False)
    lin.weight.data = w
    x = torch.randn(3, 5, 32)
    ref = lin(x)
    assert (Int8Linear(lin)(x) - ref).abs().max() < 0.05 * ref.std()


def test_int8_stage_saves_memory_keeps_mamba_and_stays_close(tiny_ckpt):
    full, q = stage(tiny_ckpt), stage(tiny_ckpt, "int8")
    assert q.stats()["param_bytes"] < 0.6 * full.stats()["param_bytes"]
    mamba = q.model.model.layers["0"].mamba
    assert (
        mamba.in_proj.weight.dtype == torch.float32 and mamba.out_proj.weight.dtype == torch.float32
    )
    assert q.model.model.layers["1"].self_attn.q_proj.weight.dtype == torch.int8
    for prompt in PROMPTS:
        a, b = logits(full, prompt), logits(q, prompt)
        lp_a, lp_b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        ll_a = sum(float(lp_a[i - 1, prompt[i]]) for i in range(1, len(prompt)))
        ll_b = sum(float(lp_b[i - 1, prompt[i]]) for i in range(1, len(prompt)))
        assert (a - b).abs().mean() < 0.05 * a.std() and (a - b).abs().max() < 0.25 * a.std()
        assert abs(ll_a - ll_b) < 0.02 * abs(ll_a)


def test_bf16_stage_runs_on_cpu_close_to_fp32(tiny_ckpt):
    full, half = stage(tiny_ckpt), stage(tiny_ckpt, dtype="bfloat16")
    a, b = logits(full, PROMPTS[0]), logits(half, PROMPTS[0])
    assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.05 * a.std()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
