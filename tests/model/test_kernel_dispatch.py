"""A stage whose decode runs through the Triton kernels (paged attention, conv and SSM updates by
slot) gives the torch path's logits: eager and fixed-shape (CUDA-graph) steps, odd slots.

On CUDA the layers pick the kernels themselves (`kernels.enabled_for`); here it is patched to run
them on CPU tensors under TRITON_INTERPRET=1. fp32 throughout: the paths differ in summation
order only, ~1e-6 on logits of order 1-10. Each test also checks that the kernels passed their
self-checks: a kernel disabled for its reference would make the comparison vacuous.
"""

import pytest
import torch

from tests.conftest import need_triton  # noqa: E402

need_triton()  # skips, or fails in CI, before the kernels are imported

from jamba_ray.engine.messages import StepMessage  # noqa: E402
from jamba_ray.model import kernels  # noqa: E402
from jamba_ray.model.kernels import selfcheck  # noqa: E402
from jamba_ray.runtime.stage import Stage  # noqa: E402
from tests.conftest import seg, stage_logits, stage_spec  # noqa: E402

BOUNDS = [(0, 3), (3, 6)]  # each stage holds an attention layer and Mamba layers
MAX_LEN = 64
CLOSE = dict(atol=1e-5, rtol=1e-5)  # fp32, summation order only


def pipeline(path, graphs=False):
    return [
        Stage(stage_spec(path, i, a, b, len(BOUNDS), 6, MAX_LEN, decode_graphs=graphs))
        for i, (a, b) in enumerate(BOUNDS)
    ]


def assert_kernels_ran(*names):
    fallbacks = selfcheck.stats()["kernel_fallbacks"]
    assert all(fallbacks.get(n) == 0 for n in names), fallbacks


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "fixed-shape"])
def test_decode_through_the_kernels_matches_the_torch_path(tiny_ckpt, monkeypatch, graphs):
    torch_path, kernel_path = pipeline(tiny_ckpt), pipeline(tiny_ckpt, graphs)
    prompts = {4: [1, 5, 9, 200, 3, 77, 12, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], 0: [1, 44]}
    prompts[2] = [1, 250, 7]  # slots 4, 0, 2: neither consecutive nor sorted
    msg = StepMessage(0, tuple(seg(s, s, 0, len(p), max_len=MAX_LEN) for s, p in prompts.items()))
    flat = [t for p in prompts.values() for t in p]
    want = stage_logits(torch_path, msg, flat)
    stage_logits(kernel_path, msg, flat)  # prefill: the same torch code on both
    lengths = {s: len(p) for s, p in prompts.items()}
    for step in (1, 2):  # the first row decodes in its second KV block
        tokens = [int(r.argmax()) for r in want]
        msg = StepMessage(step, tuple(seg(s, s, n, 1, max_len=MAX_LEN) for s, n in lengths.items()))
        lengths = {s: n + 1 for s, n in lengths.items()}
        want = stage_logits(torch_path, msg, tokens)
        with monkeypatch.context() as m:
            m.setattr(kernels, "enabled_for", lambda t: True)
            got = stage_logits(kernel_path, msg, tokens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if graphs:
        assert kernel_path[0].stats()["decode_graph_steps"] == 2
    assert_kernels_ran("triton_conv_update", "triton_ssm_update", "triton_paged_decode")
    live = list(prompts)  # the Mamba state left in the live slots is the torch path's too
    for a, b in zip(torch_path, kernel_path):
        torch.testing.assert_close(b.pool.conv[:, live], a.pool.conv[:, live], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.pool.ssm[:, live], a.pool.ssm[:, live], atol=1e-5, rtol=1e-5)


def test_prefill_chunks_through_the_varlen_scan_kernel_match_the_torch_path(tiny_ckpt, monkeypatch):
    """Three prompts prefilled in one micro-batch, odd slots, the second continuing from its
    slot's state: the varlen kernel (one launch per layer) against `ssm_scan` chunk by chunk."""
    torch_path, kernel_path = pipeline(tiny_ckpt), pipeline(tiny_ckpt)
    prompts = {4: [1, 5, 9, 200, 3, 77, 12], 0: [1, 44], 2: [1, 250, 7, 9, 10]}
    first = StepMessage(0, (seg(0, 0, 0, 2, max_len=MAX_LEN),))
    for path in (torch_path, kernel_path):  # slot 0 holds state from a first chunk
        stage_logits(path, first, prompts[0])
    segs = (seg(4, 4, 0, 7, max_len=MAX_LEN), seg(0, 0, 2, 3, max_len=MAX_LEN))
    segs += (seg(2, 2, 0, 5, max_len=MAX_LEN),)
    msg = StepMessage(1, segs)
    flat = prompts[4] + [3, 8, 13] + prompts[2]
    want = stage_logits(torch_path, msg, flat)
    with monkeypatch.context() as m:
        m.setattr(kernels, "enabled_for", lambda t: True)
        got = stage_logits(kernel_path, msg, flat)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_kernels_ran("triton_varlen_scan")
    for a, b in zip(torch_path, kernel_path):
        torch.testing.assert_close(
            b.pool.ssm[:, [4, 0, 2]], a.pool.ssm[:, [4, 0, 2]], atol=1e-5, rtol=1e-5
        )


def test_checkpoints_emitted_inside_chunks_by_the_varlen_kernel_match_the_torch_path(
    tiny_ckpt, monkeypatch
):
    """Two chunks in one launch, each emitting mid-chunk (the second at its first token too) and
    at its end: the kernel's states land in the checkpoint pool as the torch path's do."""
    from dataclasses import replace

    def stages():
        return [
            Stage(stage_spec(tiny_ckpt, i, a, b, len(BOUNDS), 6, MAX_LEN, checkpoints=6))
            for i, (a, b) in enumerate(BOUNDS)
        ]

    torch_path, kernel_path = stages(), stages()
    a = replace(seg(4, 4, 0, 9, max_len=MAX_LEN), emits=((3, 0), (9, 1)))
    b = replace(seg(2, 2, 0, 6, max_len=MAX_LEN), emits=((1, 2), (4, 3), (6, 4)))
    msg = StepMessage(0, (a, b))
    flat = [1, 5, 9, 200, 3, 77, 12, 8, 9] + [1, 250, 7, 9, 10, 11]
    stage_logits(torch_path, msg, flat)
    with monkeypatch.context() as m:
        m.setattr(kernels, "enabled_for", lambda t: True)
        stage_logits(kernel_path, msg, flat)
    for t, k in zip(torch_path, kernel_path):
        torch.testing.assert_close(k.pool.ckpt_ssm[:, :5], t.pool.ckpt_ssm[:, :5], **CLOSE)
        torch.testing.assert_close(k.pool.ckpt_conv[:, :5], t.pool.ckpt_conv[:, :5], **CLOSE)
        assert t.pool.ckpt_ssm[:, :5].abs().sum(dim=(0, 2, 3)).min() > 0  # all five written
