"""Partition planning: per-layer costs and contiguous [start, end) stage slices. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .spec import ModelSpec, dtype_bytes

Balance = Literal["params", "flops"]


def mixer_params(spec: ModelSpec, layer: int) -> int:
    h = spec.hidden_size
    if spec.is_attention(layer):
        q_out = spec.num_attention_heads * spec.head_dim
        kv_out = spec.num_key_value_heads * spec.head_dim
        return h * q_out + 2 * h * kv_out + q_out * h
    di, n, r, k = spec.d_inner, spec.mamba_d_state, spec.mamba_dt_rank, spec.mamba_d_conv
    proj_bias = (2 * di + h) if spec.mamba_proj_bias else 0
    conv = di * k + (di if spec.mamba_conv_bias else 0)
    return (
        h * 2 * di
        + conv
        + di * (r + 2 * n)
        + (r * di + di)
        + di * n
        + di
        + di * h
        + r
        + 2 * n
        + proj_bias
    )


def ffn_params(spec: ModelSpec, layer: int, active_only: bool = False) -> int:
    mlp = 3 * spec.hidden_size * spec.intermediate_size
    if not spec.is_moe(layer):
        return mlp
    experts = spec.num_experts_per_tok if active_only else spec.num_experts
    return experts * mlp + spec.num_experts * spec.hidden_size


def layer_params(spec: ModelSpec, layer: int) -> int:
    return mixer_params(spec, layer) + ffn_params(spec, layer) + 2 * spec.hidden_size


def layer_flops_per_token(spec: ModelSpec, layer: int) -> int:
    """2 FLOPs per active weight; attention's context term is left out (it depends on length)."""
    active = mixer_params(spec, layer) + ffn_params(spec, layer, active_only=True)
    return 2 * active


def embed_params(spec: ModelSpec) -> int:
    return spec.vocab_size * spec.hidden_size


def head_params(spec: ModelSpec) -> int:
    """Final norm plus lm_head (the head shares the embedding when tied)."""
    return spec.hidden_size + (
        0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size
    )


def total_params(spec: ModelSpec) -> int:
    layers = sum(layer_params(spec, i) for i in range(spec.num_hidden_layers))
    return embed_params(spec) + layers + head_params(spec)


def mamba_state_bytes(spec: ModelSpec, dtype: str, layers: range) -> int:
    """Per-sequence conv + SSM state of the Mamba layers in `layers` (SSM kept in fp32 below
    fp32)."""
    conv = spec.d_inner * spec.mamba_d_conv * dtype_bytes(dtype)
    ssm = spec.d_inner * spec.mamba_d_state * 4
    return sum(conv + ssm for i in layers if not spec.is_attention(i))


def kv_bytes_per_token(spec: ModelSpec, dtype: str, layers: range) -> int:
    per_layer = 2 * spec.num_key_value_heads * spec.head_dim * dtype_bytes(dtype)
    return sum(per_layer for i in layers if spec.is_attention(i))


@dataclass(frozen=True, slots=True)
class StagePlan:
    index: int
    start: int
    end: int
    params: int
    param_bytes: int
    flops_per_token: int
    mamba_state_bytes: int
    kv_bytes_per_token: int

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


def stage_costs(spec: ModelSpec, balance: Balance) -> list[int]:
    """Per-layer cost, with the embedding added to layer 0 and the head to the last layer."""
    per = layer_flops_per_token if balance == "flops" else layer_params
    costs = [per(spec, i) for i in range(spec.num_hidden_layers)]
    if balance == "params":
        costs[0] += embed_params(spec)
        costs[-1] += head_params(spec)
    else:
        costs[-1] += 2 * spec.vocab_size * spec.hidden_size
    return costs


def split_balanced(costs: list[int], stages: int) -> list[tuple[int, int]]:
    """Contiguous slices minimising the largest stage cost (exact DP; n is small)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for end in range(s, n + 1):
            for start in range(s - 1, end):
                cost = max(best[s - 1][start], prefix[end] - prefix[start])
                if cost < best[s][end]:
                    best[s][end], cut[s][end] = cost, start
    bounds, end = [], n
    for s in range(stages, 0, -1):
        bounds.append((cut[s][end], end))
        end = cut[s][end]
    return bounds[::-1]


def validate_slices(slices: list[tuple[int, int]], num_layers: int) -> None:
    if not slices:
        raise ConfigError("a pipeline needs at least one stage")
    expect = 0
    for start, end in slices:
        if start != expect or end <= start:
            raise ConfigError(
                f"stage slices must be contiguous, non-empty and start at 0: got {slices}"
            )
        expect = end
    if expect != num_layers:
        raise ConfigError(
            f"stage slices {slices} cover {expect} layers, the model has {num_layers}"
        )


def plan(
    spec: ModelSpec,
    stages: int | None = None,
    slices: list[tuple[int, int]] | None = None,
    dtype: str = "float32",
    balance: Balance = "params",
) -> list[StagePlan]:
    """Cut the decoder into stages: explicit `slices`, or `stages` balanced by params or FLOPs."""
    n = spec.num_hidden_layers
    if slices is None:
        if stages is None or stages < 1:
            raise ConfigError(f"number of stages must be at least 1, got {stages}")
        if stages > n:
            raise ConfigError(
                f"cannot cut {n} layers into {stages} stages: more stages than layers"
            )
        slices = split_balanced(stage_costs(spec, balance), stages)
    slices = [tuple(s) for s in slices]
    validate_slices(slices, n)
    out = []
    for i, (start, end) in enumerate(slices):
        layers = range(start, end)
        params = sum(layer_params(spec, j) for j in layers)
        params += embed_params(spec) if i == 0 else 0
        params += head_params(spec) if i == len(slices) - 1 else 0
        flops = sum(layer_flops_per_token(spec, j) for j in layers)
        out.append(
            StagePlan(
                index=i,
                start=start,
                end=end,
                params=params,
                param_bytes=params * dtype_bytes(dtype),
                flops_per_token=flops,
                mamba_state_bytes=mamba_state_bytes(spec, dtype, layers),
                kv_bytes_per_token=kv_bytes_per_token(spec, dtype, layers),
            )
        )
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(spec: ModelSpec, stages: list[StagePlan]) -> str:
    """A per-stage table as `jamba-ray plan` prints it."""
    head = (
        f"{'stage':>5}  {'layers':<10} {'params':>14} {'weights':>11} "
        f"{'mamba state/seq':>16} {'KV/token':>10}  kinds"
    )
    rows = [head, "-" * len(head)]
    for s in stages:
        kinds = " ".join(f"{j}:{spec.layer_code(j)}" for j in s.layers)
        rows.append(
            f"{s.index:>5}  [{s.start:>2}, {s.end:>2})   {s.params:>14,} "
            f"{human_bytes(s.param_bytes):>11} {human_bytes(s.mamba_state_bytes):>16} "
            f"{human_bytes(s.kv_bytes_per_token):>10}  {kinds}"
        )
    total = sum(s.params for s in stages)
    rows.append(
        f"total: {total:,} params ({total / 1e9:.2f}B), "
        f"{human_bytes(sum(s.param_bytes for s in stages))}; "
        f"mamba state/seq {human_bytes(sum(s.mamba_state_bytes for s in stages))}; "
        f"KV/token {human_bytes(sum(s.kv_bytes_per_token for s in stages))}"
    )
    return "\n".join(rows)
