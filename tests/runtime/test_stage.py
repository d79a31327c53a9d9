"""A stage in-process: it holds exactly its slice and matches transformers layer for layer."""

import pytest
import torch

from jamba_ray.config import ModelSpec
from jamba_ray.config.planner import plan
from jamba_ray.engine.messages import Segment, StepMessage
from jamba_ray.runtime.stage import Stage
from tests.conftest import PROMPTS, hf_model, seg, stage_logits, stage_spec
from tests.model.test_checkpoint import write_merged_copy


def build(path, bounds, slots=4, max_len=128, dtype="float32"):
    n = len(bounds)
    return [
        Stage(stage_spec(path, i, a, b, n, slots, max_len, dtype=dtype))
        for i, (a, b) in enumerate(bounds)
    ]


def prefill(seq_id, prompt, logits="all"):
    """A message running `prompt` from a fresh slot."""
    return StepMessage(1, (seg(seq_id, 0, 0, len(prompt), logits),))


def run(stages, msg, tokens):
    return stage_logits(stages, msg, tokens)


def test_resident_parameters_are_exactly_the_slice(tiny_ckpt):
    spec = ModelSpec.from_path(tiny_ckpt)
    plans = plan(spec, slices=[(0, 2), (2, 4), (4, 6)])
    for stage, p in zip(build(tiny_ckpt, [(0, 2), (2, 4), (4, 6)]), plans):
        assert stage.stats()["param_bytes"] == p.param_bytes
        layers = {
            int(n.split(".")[2]) for n in stage.param_names() if n.startswith("model.layers.")
        }
        assert layers == set(range(p.start, p.end))
        assert ("model.embed_tokens.weight" in stage.param_names()) == (p.index == 0)
        assert ("lm_head.weight" in stage.param_names()) == (p.index == 2)


def test_prefill_logits_match_transformers(tiny_ckpt):
    stages = build(tiny_ckpt, [(0, 3), (3, 6)])
    prompt = PROMPTS[2]
    ours = run(stages, prefill(1, prompt), prompt)
    with torch.no_grad():
        ref = hf_model(tiny_ckpt)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_bf16_tracks_fp32_at_least_as_closely_as_the_transformers_bf16_reference(tiny_ckpt):
    """bf16 is not bit-compatible with HF's bf16 slow path (it adds the dt bias and reads the SSM
    state in bf16; we keep dt, softplus and the state in fp32, as the mamba-ssm kernels do), so the
    check is the distance of each to the fp32 reference."""
    from transformers import JambaForCausalLM

    prompt = [1] + list(range(300, 330))
    with torch.no_grad():
        fp32 = hf_model(tiny_ckpt)(torch.tensor([prompt])).logits[0]
        hf16 = (
            JambaForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
            .eval()(torch.tensor([prompt]))
            .logits[0]
            .float()
        )
    ours = run(
        build(tiny_ckpt, [(0, 6)], slots=2, max_len=64, dtype="bfloat16"),
        prefill(1, prompt),
        prompt,
    )
    ours_err, hf_err = (ours - fp32).abs(), (hf16 - fp32).abs()
    assert ours_err.max() <= hf_err.max() and ours_err.mean() <= hf_err.mean()


def test_merged_expert_format_loads_to_the_same_model(tiny_ckpt, tmp_path):
    """The same weights from another file layout: equal tensors, and so equal logits. Loaded
    tensors are aligned copies, so the file offset of a tensor cannot change a matmul's bits."""
    merged = tmp_path / "merged"
    write_merged_copy(tiny_ckpt, merged)
    (a_stage,), (b_stage,) = build(tiny_ckpt, [(0, 6)]), build(str(merged), [(0, 6)])
    a_params, b_params = (
        dict(a_stage.model.named_parameters()),
        dict(b_stage.model.named_parameters()),
    )
    assert a_params.keys() == b_params.keys()
    assert all(
        torch.equal(a_params[k], b_params[k]) for k in a_params
    )  # the same data, not two paths
    prompt = PROMPTS[0]
    a = run([a_stage], prefill(1, prompt), prompt)
    b = run([b_stage], prefill(1, prompt), prompt)
    # the same weights through the same code: any difference is float rounding only
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_slot_and_length_bounds_are_checked(tiny_ckpt):
    (stage,) = build(tiny_ckpt, [(0, 6)], slots=2, max_len=16)
    with pytest.raises(ValueError, match="outside the pool"):
        stage.forward(StepMessage(1, (Segment(1, 5, 0, 2, blocks=(0,)),)), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="max length"):
        stage.forward(
            StepMessage(1, (Segment(1, 0, 0, 20, blocks=(0, 1)),)), torch.tensor([1] * 20)
        )
    (stage,) = build(tiny_ckpt, [(0, 6)], slots=2, max_len=64)
    with pytest.raises(ValueError, match="a block table of 1 blocks cannot hold 20 positions"):
        stage.forward(StepMessage(1, (Segment(1, 0, 0, 20, blocks=(0,)),)), torch.tensor([1] * 20))
