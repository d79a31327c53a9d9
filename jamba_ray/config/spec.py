"""Frozen specs derived from a Jamba `config.json`. Pure Python: no torch, no ray."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DTYPE_BYTES = {
    "float32": 4,
    "fp32": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "int8": 1,
}


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}"
        ) from None


def canonical_dtype(dtype: str) -> str:
    """Map short names (bf16, fp32, ...) to torch names (bfloat16, float32, ...)."""
    dtype_bytes(dtype)
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape facts of a Jamba model that planning, pools and scheduling need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    attn_layer_period: int
    attn_layer_offset: int
    expert_layer_period: int
    expert_layer_offset: int
    mamba_d_state: int
    mamba_d_conv: int
    mamba_expand: int
    mamba_dt_rank: int
    mamba_conv_bias: bool
    mamba_proj_bias: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None

    def __post_init__(self) -> None:
        if self.attn_layer_offset >= self.attn_layer_period:
            raise ConfigError("attn_layer_offset must be smaller than attn_layer_period")
        if self.expert_layer_offset >= self.expert_layer_period:
            raise ConfigError("expert_layer_offset must be smaller than expert_layer_period")
        if self.num_hidden_layers < 1:
            raise ConfigError("num_hidden_layers must be at least 1")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelSpec:
        if cfg.get("model_type") != "jamba":
            raise ConfigError(
                f"not a Jamba config: model_type is {cfg.get('model_type')!r}, expected 'jamba'"
            )
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        dt_rank = cfg.get("mamba_dt_rank", "auto")
        eos = cfg.get("eos_token_id", 2)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            num_experts=cfg.get("num_experts", 16),
            num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
            attn_layer_period=cfg.get("attn_layer_period", 8),
            attn_layer_offset=cfg.get("attn_layer_offset", 4),
            expert_layer_period=cfg.get("expert_layer_period", 2),
            expert_layer_offset=cfg.get("expert_layer_offset", 1),
            mamba_d_state=cfg.get("mamba_d_state", 16),
            mamba_d_conv=cfg.get("mamba_d_conv", 4),
            mamba_expand=cfg.get("mamba_expand", 2),
            mamba_dt_rank=math.ceil(hidden / 16) if dt_rank == "auto" else int(dt_rank),
            mamba_conv_bias=cfg.get("mamba_conv_bias", True),
            mamba_proj_bias=cfg.get("mamba_proj_bias", False),
            max_position_embeddings=cfg.get("max_position_embeddings", 262144),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            pad_token_id=cfg.get("pad_token_id"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelSpec:
        """Read `config.json` from a checkpoint directory or the file itself."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"no Jamba config.json at {path}")
        try:
            cfg = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from e
        return cls.from_dict(cfg)

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    def is_attention(self, layer: int) -> bool:
        return layer % self.attn_layer_period == self.attn_layer_offset

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 1 and layer % self.expert_layer_period == self.expert_layer_offset

    def layer_code(self, layer: int) -> str:
        """Short label like 'A/MoE' or 'M/MLP' for tables."""
        return ("A" if self.is_attention(layer) else "M") + (
            "/MoE" if self.is_moe(layer) else "/MLP"
        )
