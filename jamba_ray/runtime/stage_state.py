"""A stage's state: its pool (and fixed-shape decode steps on it) at the engine's sizes, and, on a
GPU, how many bytes the pool may take once the weights and a prefill's peak are counted."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config.spec import canonical_dtype
from ..engine.messages import Segment, StepMessage
from ..errors import StageFailedError
from ..model.decode_graphs import DecodeGraphs
from ..model.state_pool import StatePool
from .stage_spec import StageSpec


def build_state(model, config, spec: StageSpec) -> tuple[StatePool, DecodeGraphs | None]:
    """The state pool at `spec`'s sizes, and the decode graphs on it if `spec` asks for them."""
    dtype = getattr(torch, canonical_dtype(spec.dtype))
    pool = StatePool(model.pool_shape(config, spec), dtype, spec.device)
    if not spec.decode_graphs:
        return pool, None
    graphs = DecodeGraphs(  # padding rows go to the last slot and block: the probe's
        model,
        pool,
        config,
        first=spec.first,
        device=spec.device,
        dtype=dtype,
        scratch_slot=spec.slots - 1,
        scratch_block=spec.blocks - 1,
        max_batch=spec.slots - 1,
    )
    return pool, graphs


def state_budget(model, config, spec: StageSpec, utilization: float, tokens: int) -> int:
    """Bytes this GPU can give to state: `utilization` of the device, less what the weights and
    the peak of a `tokens`-token prefill (on a throwaway pool) take."""
    if spec.device != "cuda":
        raise StageFailedError("measure() sizes GPU stages; CPU stages take state_memory_gib")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    blocks = -(-tokens // spec.block_size) + 1
    probe = replace(spec, slots=2, blocks=blocks, checkpoints=0, max_len=tokens)
    dtype = getattr(torch, canonical_dtype(spec.dtype))
    pool = StatePool(model.pool_shape(config, probe), dtype, spec.device)
    table = list(range(blocks - 1))
    msg = StepMessage(0, (Segment(0, 0, 0, tokens, "all", blocks=tuple(table)),))
    if spec.first:
        x = torch.zeros(tokens, dtype=torch.long)  # [T] token ids
    else:
        x = torch.zeros(tokens, config.hidden_size, dtype=dtype)  # [T, H]
    with torch.inference_mode():
        model(msg, x.to(spec.device), pool, {0: table})
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    del pool
    torch.cuda.empty_cache()
    return int(total * utilization - peak)
