"""int8 weight-only quantization of attention and MLP/MoE linears; Mamba blocks stay unquantized
(as the Jamba model card advises). Per-output-channel symmetric scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.jamba.modeling_jamba import (
    JambaAttentionDecoderLayer,
    JambaMLP,
    JambaSparseMoeBlock,
)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (int8 [..., out, in], scale [..., out] fp32)."""
    scale = w.float().abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    q = torch.round(w.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ dequant(q [out, in]).T; the fused kernel where torch has one for this dtype."""
    try:
        return torch._weight_int8pack_mm(x, q, scale.to(x.dtype))
    except (RuntimeError, AttributeError):
        return F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_rows(linear.weight.data)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return int8_matmul(x.reshape(-1, self.in_features), self.weight, self.scale).reshape(
            *lead, -1
        )


class Int8Experts(nn.Module):
    """Drop-in for JambaExperts: same routing loop, int8 expert weights."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        gu, gu_s = quantize_rows(experts.gate_up_proj.data)  # [E, 2I, H], [E, 2I]
        down, down_s = quantize_rows(experts.down_proj.data)  # [E, H, I], [E, H]
        for name, t in (
            ("gate_up", gu),
            ("gate_up_scale", gu_s),
            ("down", down),
            ("down_scale", down_s),
        ):
            self.register_buffer(name, t)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden)  # [T, H]
        for e in top_k_index.unique().tolist():
            pos, k = torch.where(top_k_index == e)
            x = hidden[pos]
            gate, up = int8_matmul(x, self.gate_up[e], self.gate_up_scale[e]).chunk(2, dim=-1)
            y = int8_matmul(self.act_fn(gate) * up, self.down[e], self.down_scale[e])
            out.index_add_(0, pos, (y * top_k_weights[pos, k, None]).to(out.dtype))
        return out


def quantize_slice(model: nn.Module) -> None:
    """In place: attention projections and every MLP/MoE linear to int8; Mamba and router
    untouched."""
    for layer in model.model.layers.values():
        if isinstance(layer, JambaAttentionDecoderLayer):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, Int8Linear(getattr(layer.self_attn, name)))
        ff = layer.feed_forward
        if isinstance(ff, JambaMLP):
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(ff, name, Int8Linear(getattr(ff, name)))
        elif isinstance(ff, JambaSparseMoeBlock):
            ff.experts = Int8Experts(ff.experts)
