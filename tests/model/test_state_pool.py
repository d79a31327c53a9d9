"""The state pool: a step message's state operations, and export/import (a replacement stage gets
back exactly what was exported)."""

import pytest
import torch

from jamba_ray.engine.messages import Fork, Segment, StepMessage
from jamba_ray.model.state_pool import PoolShape, StatePool


def pool(seed: int) -> StatePool:
    shape = PoolShape(2, 1, 3, 6, 4, 4, 24, 8, 4, 16, 2, 8)
    p = StatePool(shape, torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    for t in (p.ckpt_conv, p.ckpt_ssm, p.k, p.v):
        t.copy_(torch.randn(t.shape, generator=g))
    return p


def test_exported_checkpoints_and_blocks_load_into_a_fresh_pool_at_the_same_indices():
    old, new = pool(0), pool(1)
    items = old.export((3, 1), (5, 0, 2))
    assert len(items) == 5 and all(t.device.type == "cpu" for pair in items for t in pair)
    new.load([3, 1], [5, 0, 2], items)
    # copies, not computations: bit for bit (rtol = atol = 0)
    for c in (3, 1):
        torch.testing.assert_close(new.ckpt_conv[:, c], old.ckpt_conv[:, c], rtol=0, atol=0)
        torch.testing.assert_close(new.ckpt_ssm[:, c], old.ckpt_ssm[:, c], rtol=0, atol=0)
    for b in (5, 0, 2):
        torch.testing.assert_close(new.k[:, b], old.k[:, b], rtol=0, atol=0)
        torch.testing.assert_close(new.v[:, b], old.v[:, b], rtol=0, atol=0)
    assert not torch.equal(new.k[:, 1], old.k[:, 1])  # others untouched
    old.k.zero_()  # the export is a copy, not a view
    assert items[2][0].abs().sum() > 0


def test_a_message_applies_its_state_operations_in_order_then_its_segments():
    """Forgotten tables, block copies, forks, saves, exports, then each segment's table and slot:
    a save sees the fork before it, an export the save and the copy before it."""
    p = pool(0)
    for t in (p.conv, p.ssm):
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(2)))
    p.tables = {7: [0, 1], 9: [2]}
    slot0 = (p.conv[:, 0].clone(), p.ssm[:, 0].clone())
    block1, ckpt0 = (p.k[:, 1].clone(), p.v[:, 1].clone()), p.ckpt_conv[:, 0].clone()
    msg = StepMessage(
        3,
        (
            Segment(7, 0, 8, 1, blocks=(4,), table_start=2),  # decode: one block appended
            Segment(11, 2, 0, 4, blocks=(5,)),  # a fresh prompt
            Segment(12, 1, 4, 2, blocks=(3, 2), restore=0),  # a prefix hit
        ),
        forks=(Fork(0, (1,)),),
        copies=((1, 3),),
        saves=((1, 2),),
        export_ckpts=(2,),
        export_blocks=(3,),
        finished=(9,),
    )
    (conv, ssm), (k, v) = p.apply(msg)
    # copies, not computations: bit for bit (rtol = atol = 0)
    exact = {"rtol": 0, "atol": 0}
    torch.testing.assert_close((conv, ssm), slot0, **exact)  # fork, save, export
    torch.testing.assert_close((k, v), block1, **exact)  # copy, export
    assert p.tables == {7: [0, 1, 4], 11: [5], 12: [3, 2]}  # 9 forgotten
    torch.testing.assert_close(p.conv[:, 1], ckpt0, **exact)  # restored over the fork
    assert not p.conv[:, 2].any() and not p.ssm[:, 2].any()  # started at zero
    torch.testing.assert_close(p.conv[:, 0], slot0[0], **exact)  # a decode keeps its state
    assert p.apply(StepMessage(4, ())) is None  # nothing exported


def test_a_segment_past_its_block_table_is_refused():
    p = pool(0)
    with pytest.raises(ValueError, match="block table of 1 blocks"):
        p.apply(StepMessage(0, (Segment(0, 0, 0, 5, blocks=(0,)),)))
