"""Fixed-shape decode steps (CUDA graphs on GPUs) give the eager path's logits, whatever the
batch."""

import pytest
import torch

from jamba_ray.engine.messages import StepMessage
from jamba_ray.model.decode_graphs import bucket, kv_bucket
from jamba_ray.runtime.stage import Stage
from tests.conftest import seg, stage_logits, stage_spec

BOUNDS = [(0, 3), (3, 6)]


def stages(path, graphs: bool, slots=6, max_len=600):
    return [
        Stage(stage_spec(path, i, a, b, len(BOUNDS), slots, max_len, decode_graphs=graphs))
        for i, (a, b) in enumerate(BOUNDS)
    ]


def run(pipe, msg, tokens):
    return stage_logits(pipe, msg, tokens)


def test_buckets():
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 3, 4, 5, 9)] == [1, 4, 4, 8, None]
    assert kv_bucket(1, 4096) == 256 and kv_bucket(257, 4096) == 512 and kv_bucket(300, 400) == 400


def test_padded_batches_odd_slots_and_growing_kv_match_the_eager_path(tiny_ckpt):
    eager, fixed = stages(tiny_ckpt, False), stages(tiny_ckpt, True)
    # Three sequences on slots 4, 0, 2 (not consecutive); the first is long enough to cross the
    # 256-key bucket while decoding; the second asks for no logits on some steps.
    prompts = {4: [1] + [7 + i % 300 for i in range(249)], 0: [1, 5, 9, 200], 2: [1, 44, 8]}
    seqs = {slot: list(p) for slot, p in prompts.items()}
    msg = StepMessage(0, tuple(seg(slot, slot, 0, len(p)) for slot, p in prompts.items()))
    flat = [t for p in prompts.values() for t in p]
    logits = run(eager, msg, flat)
    torch.testing.assert_close(
        run(fixed, msg, flat), logits, atol=0, rtol=0
    )  # prefill: the same code
    nxt = {slot: int(row.argmax()) for slot, row in zip(prompts, logits)}
    for step in range(1, 13):
        if step == 8:
            nxt.pop(0)  # a sequence finishes: the batch shrinks to another bucket
        segs = tuple(
            seg(slot, slot, len(seqs[slot]), 1, "none" if slot == 0 and step % 2 else "last")
            for slot in nxt
        )
        for slot, t in nxt.items():
            seqs[slot].append(t)
        msg = StepMessage(step, segs)
        tokens = [nxt[slot] for slot in nxt]
        want, got = run(eager, msg, tokens), run(fixed, msg, tokens)
        assert got.shape == want.shape == (len(msg.logit_rows()), want.shape[1])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        with_logits = [s.slot for s in segs if s.logits == "last"]
        nxt.update({slot: int(row.argmax()) for slot, row in zip(with_logits, want)})
    stats = [s.stats() for s in fixed]
    # (batch 4, kv 256), (batch 4, kv 512) before the shrink, (batch 2, kv 512) after it
    assert all(s["decode_graph_steps"] == 12 and s["decode_graph_shapes"] == 3 for s in stats)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="CUDA graph capture needs an NVIDIA GPU of SM90+ (bf16 grouped_mm experts)",
)
def test_cuda_graphs_are_captured_and_replay_the_eager_logits(tiny_ckpt):
    def cuda_stages(graphs):
        return [
            Stage(
                stage_spec(
                    tiny_ckpt,
                    i,
                    a,
                    b,
                    len(BOUNDS),
                    4,
                    128,
                    dtype="bfloat16",
                    device="cuda",
                    decode_graphs=graphs,
                )
            )
            for i, (a, b) in enumerate(BOUNDS)
        ]

    eager, fixed = cuda_stages(False), cuda_stages(True)
    prompt = [1, 5, 9, 200, 3]
    msg = StepMessage(0, (seg(0, 1, 0, len(prompt)),))
    tok = int(run(eager, msg, prompt)[0].argmax())
    run(fixed, msg, prompt)
    for step in range(1, 6):
        msg = StepMessage(step, (seg(0, 1, len(prompt) + step - 1, 1),))
        want, got = run(eager, msg, [tok]), run(fixed, msg, [tok])
        torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
        tok = int(want[0].argmax())
    stats = [s.stats() for s in fixed]
    assert all(
        s["decode_graphs_disabled"] is None and s["decode_graphs_captured"] == 1 for s in stats
    ), stats


@pytest.mark.parametrize(
    "error, off",
    [
        (RuntimeError("operation not permitted when stream is capturing"), True),
        (torch.cuda.OutOfMemoryError("out of memory"), False),
    ],
)
def test_a_failed_capture_falls_back_to_the_eager_path(error, off, tiny_ckpt):
    """Any capture error turns graphs off for the stage; running out of memory only for that
    bucket."""
    eager, fixed = stages(tiny_ckpt, False), stages(tiny_ckpt, True)

    def refuse(entry):
        raise error

    for st in fixed:  # as on a GPU whose kernels cannot be captured
        st.graphs.capture, st.graphs._capture = True, refuse
    prompt = [1, 5, 9, 200]
    msg = StepMessage(0, (seg(0, 0, 0, len(prompt)),))
    tok = int(run(eager, msg, prompt)[0].argmax())
    run(fixed, msg, prompt)
    for step in (1, 2):
        msg = StepMessage(step, (seg(0, 0, len(prompt) + step - 1, 1),))
        want = run(eager, msg, [tok])
        torch.testing.assert_close(run(fixed, msg, [tok]), want, atol=1e-5, rtol=0)
        tok = int(want[0].argmax())
    stats = fixed[0].stats()
    assert stats["decode_graph_steps"] == 0
    if off:
        assert "stream is capturing" in stats["decode_graphs_disabled"]
    else:
        assert stats["decode_graphs_disabled"] is None and stats["decode_graph_eager_buckets"] == 1


def test_buckets_whose_kv_gather_is_too_large_decode_eagerly(tiny_ckpt, monkeypatch):
    from jamba_ray.model import decode_graphs

    monkeypatch.setattr(decode_graphs, "GRAPH_KV_BYTES", 0)
    eager, fixed = stages(tiny_ckpt, False), stages(tiny_ckpt, True)
    prompt = [1, 5, 9, 200]
    msg = StepMessage(0, (seg(0, 0, 0, len(prompt)),))
    tok = int(run(eager, msg, prompt)[0].argmax())
    run(fixed, msg, prompt)
    msg = StepMessage(1, (seg(0, 0, len(prompt), 1),))
    torch.testing.assert_close(run(fixed, msg, [tok]), run(eager, msg, [tok]), atol=1e-5, rtol=0)
    steps = [st.stats()["decode_graph_steps"] for st in fixed]
    assert steps == [0, 0]  # both stages hold an attention layer of the tiny layout
