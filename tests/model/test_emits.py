"""Checkpoints emitted inside a prefill chunk hold the Mamba state a run of that prefix alone
leaves in its slot: conv windows that straddle the slot's earlier state and the chunk, SSM states
mid-chunk, at the chunk's end, and in a one-token (decode-shaped) segment; two stages, torch path.

fp32: the emitted and the reference states come from the same arithmetic over differently sized
batches and scan chunks (the chunked scan groups tokens in pairs from the chunk's start), so they
agree to summation order, ~1e-6; a state off by one token differs by ~1e-2 or more.
"""

import torch

from jamba_ray.engine.messages import Segment, StepMessage
from jamba_ray.runtime.stage import Stage
from tests.conftest import seg, stage_logits, stage_spec

BOUNDS = [(0, 3), (3, 6)]
MAX_LEN = 64
PROMPT = [1, 5, 9, 200, 3, 77, 12, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 40, 41, 42]
CLOSE = dict(atol=1e-5, rtol=1e-5)


def pipeline(path):
    return [
        Stage(stage_spec(path, i, a, b, len(BOUNDS), 6, MAX_LEN, checkpoints=6))
        for i, (a, b) in enumerate(BOUNDS)
    ]


def emitting(seq_id, slot, start, length, emits):
    return Segment(**{**_fields(seg(seq_id, slot, start, length, max_len=MAX_LEN)), "emits": emits})


def _fields(s: Segment) -> dict:
    return {f: getattr(s, f) for f in Segment.__slots__}


def assert_checkpoint_is_prefix_state(stages, ckpt: int, n: int) -> None:
    """Checkpoint `ckpt` equals the state slot 5 holds after prefilling PROMPT[:n] alone."""
    ref = StepMessage(99, (seg(5, 5, 0, n, max_len=MAX_LEN),))
    stage_logits(stages, ref, PROMPT[:n])
    for s in stages:
        p = s.pool
        torch.testing.assert_close(p.ckpt_conv[:, ckpt], p.conv[:, 5], **CLOSE)
        torch.testing.assert_close(p.ckpt_ssm[:, ckpt], p.ssm[:, 5], **CLOSE)


def test_emitted_checkpoints_hold_the_state_after_their_prefix(tiny_ckpt):
    stages = pipeline(tiny_ckpt)
    # a first chunk of 2 (the slot's conv window then holds 2 real inputs), then 13 tokens
    # emitting after 3 (its window straddles both chunks), 10 and 15 (the chunk's end), then
    # a one-token segment emitting after 16
    msgs = [
        (StepMessage(0, (emitting(0, 0, 0, 2, ()),)), PROMPT[:2]),
        (StepMessage(1, (emitting(0, 0, 2, 13, ((3, 0), (10, 1), (15, 2))),)), PROMPT[2:15]),
        (StepMessage(2, (emitting(0, 0, 15, 1, ((16, 3),)),)), PROMPT[15:16]),
    ]
    for msg, tokens in msgs:
        stage_logits(stages, msg, tokens)
    for ckpt, n in ((0, 3), (1, 10), (2, 15), (3, 16)):
        assert_checkpoint_is_prefix_state(stages, ckpt, n)
