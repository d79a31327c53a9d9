"""How many sequences fit: state slots from the memory budget and per-sequence state sizes. Pure."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ConfigError
from .engine_config import EngineConfig
from .planner import StagePlan
from .spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Capacity:
    max_num_seqs: int
    max_model_len: int
    bytes_per_seq: int  # on the stage that needs the most
    note: str = ""


def derive_capacity(spec: ModelSpec, cfg: EngineConfig, plans: list[StagePlan]) -> Capacity:
    """Clamp max_model_len to the model and max_num_seqs to the state budget, saying why."""
    notes = []
    max_len = cfg.model.max_model_len or min(spec.max_position_embeddings, 4096)
    if max_len > spec.max_position_embeddings:
        notes.append(
            f"max_model_len {max_len} clamped to the model's {spec.max_position_embeddings}"
        )
        max_len = spec.max_position_embeddings
    per_seq = max(p.mamba_state_bytes + p.kv_bytes_per_token * max_len for p in plans)
    budget = int(cfg.state.state_memory_gib * 2**30)
    fit = budget // max(per_seq, 1)
    if fit < 1:
        raise ConfigError(
            f"state_memory_gib={cfg.state.state_memory_gib} holds no sequence: "
            f"one needs {per_seq / 2**20:.1f} MiB "
            f"at max_model_len={max_len}; raise the budget or lower max_model_len"
        )
    seqs = cfg.scheduler.max_num_seqs
    if fit < seqs:
        notes.append(
            f"max_num_seqs {seqs} clamped to {fit}: "
            f"each sequence needs {per_seq / 2**20:.2f} MiB of "
            f"Mamba state + KV at max_model_len={max_len}, "
            f"the budget is {cfg.state.state_memory_gib} GiB per stage"
        )
        seqs = fit
    note = "; ".join(notes)
    if note:
        log.warning(note)
    return Capacity(seqs, max_len, per_seq, note)
