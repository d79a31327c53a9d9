"""The Triton paged decode attention kernel vs attention.py's decode paths and its torch reference
(under TRITON_INTERPRET=1 on CPU tensors).

One batch holds rows of lengths 1, bs, bs + 1 and 3 * bs + 2 (a lone first position, a full block,
one past it, several blocks and a partial one), their blocks non-consecutive and unsorted.
Tolerances: fp32 differs from the references only in summation order and exp2 vs exp (a few ulps
of values of order 1): 1e-5. bf16: q, K, V are the same bf16 values on every path, but the kernel
and the reference accumulate in fp32 while SDPA on CPU rounds intermediate products to bf16, and
on the GPU the kernel rounds its probabilities to bf16 for the PV product (as flash attention
does): a few bf16 ulps (2^-8 relative) of outputs of order 1, so 2e-2.
"""

from types import SimpleNamespace

import pytest
import torch

from tests.conftest import need_triton  # noqa: E402

need_triton()  # skips, or fails in CI, before the kernels are imported

from jamba_ray.model import kernels  # noqa: E402
from jamba_ray.model.attention import decode_padded, decode_ref  # noqa: E402
from jamba_ray.model.kernels import paged_attention  # noqa: E402
from jamba_ray.model.kernels.reference import paged_decode_ref  # noqa: E402
from jamba_ray.model.layout import Layout  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def lengths(bs: int) -> list[int]:
    return [1, bs, bs + 1, 3 * bs + 2]


def case(hd, nh, kvh, bs, dtype, seed=0):
    """q [B, nh, hd], pools [NBLK, kvh, bs, hd], padded tables [B, NB] and each row's own blocks:
    the blocks are a shuffled subset of the pool, the last block is the padding (scratch)."""
    gen = torch.Generator().manual_seed(seed)
    lens = lengths(bs)
    own = [-(-n // bs) for n in lens]
    nblk = sum(own) + 4  # some blocks belong to no row
    ids = torch.randperm(nblk - 1, generator=gen).tolist()
    blocks, width = [], max(own)
    for nb in own:
        blocks.append(ids[:nb])
        ids = ids[nb:]
    table = torch.tensor([b + [nblk - 1] * (width - len(b)) for b in blocks], dtype=torch.int32)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEV, dtype)

    q, k, v = rand(len(lens), nh, hd), rand(nblk, kvh, bs, hd), rand(nblk, kvh, bs, hd)
    return q, k, v, table.to(DEV), torch.tensor(lens, device=DEV), blocks


def layout(table, lens, blocks, bs) -> Layout:
    """The eager decode layout of these rows (what `Layout.build` makes of decode segments)."""
    d = len(lens)
    rows = torch.arange(d, device=DEV)
    pos = lens - 1
    own = tuple(torch.tensor(b, device=DEV) for b in blocks)
    return Layout(rows, rows, pos, (), None, rows, rows[:0], d, int(lens.max()), bs,
                  decode_blocks=own)  # fmt: skip


SHAPES = [  # (head dim, query heads, kv heads, block size, tile): GQA ratios 1, 2, 4
    (16, 4, 4, 4, 16),  # 4 blocks per tile
    (24, 4, 2, 16, 16),  # the 3bs+2 row spans 4 tiles
    (16, 8, 2, 16, None),  # the default tile: one tile per row
    (24, 8, 2, 4, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd, nh, kvh, bs, tile", SHAPES)
def test_kernel_matches_decode_ref_and_the_torch_reference(hd, nh, kvh, bs, tile, dtype):
    q, k, v, table, lens, blocks = case(hd, nh, kvh, bs, dtype)
    scale = hd**-0.5
    out = paged_attention.paged_decode(q, k, v, table, lens, scale, tile=tile)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, paged_decode_ref(q, k, v, table, lens, scale), **TOL[dtype])
    attn = SimpleNamespace(scaling=scale)  # all decode_ref reads of the attention module
    want = decode_ref(attn, q, layout(table, lens, blocks, bs), k, v)
    torch.testing.assert_close(out, want, **TOL[dtype])


def test_kernel_matches_the_fixed_shape_path():
    """The padded tables the CUDA-graph step uses: same result as its masked SDPA."""
    hd, nh, kvh, bs = 16, 8, 2, 4
    q, k, v, table, lens, _ = case(hd, nh, kvh, bs, torch.float32, seed=1)
    lay = Layout.fixed_decode(lens * 0, lens - 1, table.long(), table[:, 0].long(), bs)
    want = decode_padded(SimpleNamespace(scaling=0.3), q, lay, k, v)
    out = kernels.paged_decode(q, k, v, table, lens, 0.3)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_each_row_reads_only_its_own_blocks_up_to_its_own_length():
    """Every pool position that is not a row's own position [0, len) holds NaN: the padding
    block, the blocks no row owns and the tail of each row's last block. Any read of one would
    make that row NaN."""
    hd, nh, kvh, bs = 16, 4, 2, 4
    q, k, v, table, lens, blocks = case(hd, nh, kvh, bs, torch.float32, seed=2)
    live = torch.zeros(k.shape[0], bs, dtype=torch.bool)
    for b, n in zip(blocks, lens.tolist()):
        for p in range(n):
            live[b[p // bs], p % bs] = True
    dead = ~live[:, None, :, None].to(DEV).expand_as(k)
    want = paged_decode_ref(q, k, v, table, lens, 0.25)
    k, v = k.masked_fill(dead, float("nan")), v.masked_fill(dead, float("nan"))
    out = paged_attention.paged_decode(q, k, v, table, lens, 0.25, tile=16)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_a_row_of_length_zero_gives_zeros_and_an_empty_batch_nothing():
    q, k, v, table, lens, _ = case(16, 4, 2, 4, torch.float32, seed=3)
    lens[1] = 0
    out = paged_attention.paged_decode(q, k, v, table, lens, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, paged_decode_ref(q, k, v, table, lens, 0.25))
    empty = paged_attention.paged_decode(q[:0], k, v, table[:0], lens[:0], 0.25)
    assert empty.shape == (0, 4, 16)


def test_heads_that_do_not_group_are_refused():
    q, k, v, table, lens, _ = case(16, 4, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="do not group"):
        paged_attention.paged_decode(q[:, :3], k, v, table, lens, 0.25)
