"""The state pool's export/import: a replacement stage gets back exactly what was exported."""

import torch

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
