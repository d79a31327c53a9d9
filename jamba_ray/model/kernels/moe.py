"""Jamba's sparse MoE as one grouped GEMM per projection, the routing fused around it.

The T x top_k (token, expert) pairs are sorted by expert, so each expert's rows form one contiguous
segment of the sorted batch; `offsets` [E] holds where each segment ends. Both expert projections
then run as one grouped GEMM over the segments (`torch._grouped_mm`), the routing weight scales
each row, and the pairs are put back in token order and summed over top_k. No host sync anywhere
on the grouped path (offsets come from a searchsorted, not a bincount or nonzero), so it can be
captured in a CUDA graph. Where grouped GEMMs are unavailable (no `torch._grouped_mm`, a CUDA
device below SM80, strides it cannot take) the same sorted segments run as a loop over experts:
the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As `JambaTopKRouter`: top_k of the softmax over experts, not renormalised.
    router_logits [T, E] -> (weights [T, top_k] fp32, expert ids [T, top_k])."""
    return torch.topk(router_logits.softmax(-1, dtype=torch.float32), top_k, dim=-1)


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int):
    """(order [S], token of each sorted pair [S], offsets [E] int32): S = T * top_k pairs sorted
    by expert (stable: token order within an expert); expert e owns rows offsets[e-1]:offsets[e]."""
    ids = top_k_index.reshape(-1)  # [S]
    sorted_ids, order = torch.sort(ids, stable=True)
    experts = torch.arange(num_experts, device=ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)  # [E]
    return order, order // top_k_index.shape[-1], offsets


def grouped_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs x [S, K] @ w [E, K, N] as one grouped GEMM here: bf16 on
    SM80+ on CUDA (any dtype on CPU), rows of both operands 16-byte aligned (its CPU kernel checks
    that; CUDA needs it for TMA)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda and (  # the fused CUDA kernel is bf16 (other dtypes loop inside torch)
        x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0)
    ):
        return False
    aligned = all(
        (s * t.element_size()) % 16 == 0 for t in (x, w) for s in t.stride()[:-1] if s != 1
    )
    return aligned and all(t.data_ptr() % 16 == 0 for t in (x, w))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, grouped: bool):
    """x [S, K] sorted by expert @ w [E, K, N] per segment -> [S, N] (rows past offsets[-1]: 0)."""
    if grouped:
        return torch._grouped_mm(x, w, offs=offsets)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):  # the reference: one matmul per expert's segment
        if end > start:
            out[start:end] = x[start:end] @ w[e]
        start = end
    return out


def moe_grouped(hidden, top_k_index, top_k_weights, gate_up, down, act=F.silu, grouped=None):
    """Sparse MoE of T tokens: hidden [T, H]; top_k_index [T, k] expert ids and top_k_weights
    [T, k] (the router's); gate_up [E, 2I, H] (gate rows first, as `JambaExperts.gate_up_proj`);
    down [E, H, I]; act: the gate's activation. Returns [T, H] in hidden's dtype:
    sum_j w[t, j] * down[e] @ (act(gate[e] @ h) * up[e] @ h) with e = top_k_index[t, j].
    grouped: force the grouped GEMM (True) or the per-expert loop (False); None picks."""
    t, h = hidden.shape
    k = top_k_index.shape[-1]
    order, token, offsets = sort_by_expert(top_k_index, gate_up.shape[0])
    x = hidden[token]  # [S, H], expert-contiguous
    w_up, w_down = gate_up.transpose(1, 2), down.transpose(1, 2)  # [E, H, 2I], [E, I, H]
    if grouped is None:
        grouped = grouped_supported(x, w_up) and grouped_supported(x, w_down)
    gate, up = grouped_mm(x, w_up, offsets, grouped).chunk(2, dim=-1)  # [S, I] each
    y = grouped_mm(act(gate) * up, w_down, offsets, grouped)  # [S, H]
    y = y.float() * top_k_weights.reshape(-1)[order, None].float()
    out = torch.empty_like(y)
    out[order] = y  # back to (token, j) order: [S, H]
    return out.view(t, k, h).sum(1).to(hidden.dtype)  # summed over top_k in fp32


def experts_forward(experts, hidden, top_k_index, top_k_weights):
    """`JambaExperts.forward` as a transformers experts implementation (`register`)."""
    return moe_grouped(
        hidden, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj, experts.act_fn
    )


def register(name: str = "jamba_ray") -> str:
    """Make `config._experts_implementation = name` run `moe_grouped` in transformers' experts."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(name, experts_forward)
    return name
