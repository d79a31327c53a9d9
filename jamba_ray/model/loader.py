"""A stage's weights: its slice of Jamba built on the meta device and filled with exactly its own
tensors (read from the shards that hold them), at the stage's dtype and device."""

from __future__ import annotations

from typing import Protocol

import torch

from ..config.model_path import resolve
from ..config.spec import canonical_dtype
from .checkpoint import load_slice
from .quant import quantize_slice
from .slice import SliceModel


class SliceSpec(Protocol):
    """What loading needs of a stage's spec (`runtime.stage_spec.StageSpec` has it)."""

    model: str
    start: int
    end: int
    dtype: str
    device: str
    quantization: str | None

    @property
    def first(self) -> bool: ...

    @property
    def last(self) -> bool: ...


def load_slice_model(spec: SliceSpec) -> tuple[SliceModel, object]:
    """(the slice in eval mode, its JambaConfig)."""
    from transformers import JambaConfig

    ckpt = resolve(spec.model)
    config = JambaConfig.from_pretrained(ckpt.root)
    # GPUs: tokens sorted by expert into one grouped GEMM (model/kernels/moe.py); CPU: eager, as
    # from_pretrained picks there
    config._experts_implementation = _experts(spec.device, spec.quantization)
    dtype = getattr(torch, canonical_dtype(spec.dtype))
    tensors, _ = load_slice(
        ckpt, spec.start, spec.end, spec.first, spec.last, config.tie_word_embeddings
    )
    labels = tensors["score.weight"].shape[0] if "score.weight" in tensors else 0
    with torch.device("meta"):
        model = SliceModel(config, spec.start, spec.end, spec.first, spec.last, labels)
    if spec.last and "lm_head.weight" not in tensors:  # a tied head shares the embedding
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    if spec.last and not spec.first:
        tensors.pop("model.embed_tokens.weight", None)
    # Fresh (aligned) copies: a view into the file keeps its byte offset, and on CPU a matmul's
    # bits can depend on its operand's alignment; numerics must not depend on shard layout.
    tensors = {k: _owned(v, spec.device, _param_dtype(k, dtype)) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if spec.quantization == "int8":
        quantize_slice(model)
    return model.eval(), config


def _experts(device: str, quantization: str | None) -> str:
    if device != "cuda" or quantization:  # (int8 experts route in their own loop)
        return "eager"
    from .kernels import moe

    return moe.register()


def _owned(t: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=dtype, device=device)
    out.copy_(t)
    return out


def _param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Mamba's A_log and D stay fp32 below fp32, as in the reference checkpoints' use."""
    if name.endswith(("mamba.A_log", "mamba.D")):
        return torch.float32
    return dtype
