"""Grouped MoE (tokens sorted by expert, one grouped GEMM per projection) vs transformers' eager
`JambaSparseMoeBlock`.

fp32: the paths differ in summation order only (the expert matmuls' blocking, and the top-k sum in
fp32 vs in place), a few ulps of outputs of order 1: 1e-5. bf16: both round each matmul to bf16,
but the eager path adds the top-k terms in bf16 and we in fp32: one bf16 ulp (2^-8 relative) of
outputs of order 1, so 2e-2.
"""

import pytest
import torch
from transformers import JambaConfig
from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock

from jamba_ray.model.kernels import moe

E, TOP_K, H, INTER = 8, 2, 64, 96  # rows of 16-byte multiples: torch._grouped_mm takes them
GROUPED = [False] + ([True] if hasattr(torch, "_grouped_mm") else [])


def block(dtype=torch.float32, seed=0) -> JambaSparseMoeBlock:
    cfg = JambaConfig(
        hidden_size=H, intermediate_size=INTER, num_experts=E, num_experts_per_tok=TOP_K
    )
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    b = JambaSparseMoeBlock(cfg)
    for p in b.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return b.to(dtype).eval()


def inputs(t: int, dtype=torch.float32, seed=1) -> torch.Tensor:
    return torch.randn(t, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ours(b, x, grouped):
    _, weights, ids = b.router(x)
    return moe.moe_grouped(
        x, ids, weights, b.experts.gate_up_proj, b.experts.down_proj, b.experts.act_fn, grouped
    )


@pytest.mark.parametrize("grouped", GROUPED, ids=lambda g: "grouped" if g else "loop")
@pytest.mark.parametrize("t", [1, 3, 37])
def test_matches_the_eager_experts_in_fp32(t, grouped):
    b, x = block(), inputs(t)
    with torch.no_grad():
        want = b(x[None])[0]
        torch.testing.assert_close(ours(b, x, grouped), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grouped", GROUPED, ids=lambda g: "grouped" if g else "loop")
def test_matches_the_eager_experts_in_bf16(grouped):
    b, x = block(torch.bfloat16), inputs(37, torch.bfloat16)
    with torch.no_grad():
        got, want = ours(b, x, grouped), b(x[None])[0]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_sorted_segments_and_offsets():
    ids = torch.tensor([[3, 0], [0, 5], [3, 1]])  # experts 2, 4, 6, 7 get no token
    order, token, offsets = moe.sort_by_expert(ids, E)
    flat = ids.reshape(-1)
    assert flat[order].tolist() == [0, 0, 1, 3, 3, 5]
    assert token.tolist() == [0, 1, 2, 0, 2, 1]  # token order kept within an expert
    assert offsets.dtype == torch.int32 and offsets.tolist() == [2, 3, 3, 5, 5, 6, 6, 6]


def test_route_is_the_routers_top_k():
    b, x = block(), inputs(9)
    with torch.no_grad():
        logits, weights, ids = b.router(x)
        w, i = moe.route(logits, TOP_K)
    assert torch.equal(i, ids)
    torch.testing.assert_close(w, weights)


def test_registered_as_a_transformers_experts_implementation():
    b, x = block(), inputs(37)
    with torch.no_grad():
        want = b(x[None])
        b.experts.config._experts_implementation = moe.register()
        got = b(x[None])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_no_tokens():
    b = block()
    with torch.no_grad():
        assert ours(b, inputs(0), False).shape == (0, H)
