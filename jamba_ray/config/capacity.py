"""How much state each stage holds: Mamba slots, checkpoints and KV blocks from its budget. Pure.

KV is paged: a sequence holds only the blocks its tokens fill, so the budget left after the
fixed-size Mamba state (one slot per running sequence, one per checkpoint) becomes KV blocks shared
by all sequences, long and short. Every stage holds the same numbering; the stage with the most
state per sequence or per token sets the count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ConfigError
from .engine_config import EngineConfig
from .planner import StagePlan
from .spec import ModelSpec

log = logging.getLogger(__name__)

GiB = 2**30
SPARE_PER_SEQ = 4  # checkpoints per slot that spare budget may add (`spare_checkpoints`)


@dataclass(frozen=True, slots=True)
class Capacity:
    max_num_seqs: int  # Mamba state slots (running sequences)
    max_model_len: int
    num_blocks: int  # KV blocks
    block_size: int = 16
    num_checkpoints: int = 0  # Mamba checkpoints for prefix reuse
    note: str = ""

    def concurrent(self, tokens: int) -> int:
        """Sequences of `tokens` tokens that fit at once (0 when longer than max_model_len)."""
        if tokens > self.max_model_len:
            return 0
        return min(self.max_num_seqs, self.num_blocks // -(-tokens // self.block_size))


def per_stage(plans: list[StagePlan], block_size: int) -> tuple[int, int]:
    """(Mamba state bytes per slot, KV bytes per block) on the stage that needs the most."""
    return (
        max(p.mamba_state_bytes for p in plans),
        max(p.kv_bytes_per_token for p in plans) * block_size,
    )


def derive_capacity(
    spec: ModelSpec, cfg: EngineConfig, plans: list[StagePlan], budget_bytes: int | None = None
) -> Capacity:
    """Clamp max_model_len to the model and the slots to the budget (`budget_bytes`, measured on
    the stages, else `state_memory_gib`), saying why."""
    notes: list[str] = []
    st = cfg.state
    max_len = cfg.model.max_model_len or min(spec.max_position_embeddings, 4096)
    if max_len > spec.max_position_embeddings:
        notes.append(
            f"max_model_len {max_len} clamped to the model's {spec.max_position_embeddings}"
        )
        max_len = spec.max_position_embeddings
    slot_bytes, block_bytes = per_stage(plans, st.block_size)
    budget = budget_bytes if budget_bytes is not None else int(st.state_memory_gib * GiB)
    min_blocks = -(-max_len // st.block_size) + 1  # one whole sequence (+ the probe's block)
    # its slot, and checkpoints: one for prefix reuse, one more for its recovery snapshot
    snapshots = cfg.recovery.recovery_snapshots and cfg.placement.backend == "ray"
    per_ckpt = (2 if snapshots else 1) if st.enable_prefix_caching else 0
    per_seq = slot_bytes * (1 + per_ckpt)
    fit = (budget - min_blocks * block_bytes) // max(per_seq, 1) - 1  # (-1: the probe's slot)
    if fit < 1:
        raise ConfigError(
            f"state_memory_gib={st.state_memory_gib} holds no sequence: one needs "
            f"{(per_seq * 2 + min_blocks * block_bytes) / 2**20:.1f} MiB at "
            f"max_model_len={max_len}; raise the budget or lower max_model_len"
        )
    seqs = cfg.scheduler.max_num_seqs
    if fit < seqs:
        notes.append(
            f"max_num_seqs {seqs} clamped to {fit}: the {st.state_memory_gib} GiB budget "
            f"per stage holds {fit} Mamba slots beside KV for one {max_len}-token sequence"
        )
        seqs = fit
    ckpts = (st.num_checkpoints or seqs * per_ckpt) if st.enable_prefix_caching else 0

    def after_slots(ckpts: int) -> tuple[int, int]:
        """(bytes left for blocks, blocks every slot and checkpoint could fill)."""
        return budget - (seqs + 1 + ckpts) * slot_bytes, (seqs + ckpts) * (min_blocks - 1)

    left, useful = after_slots(ckpts)
    if st.enable_prefix_caching and st.num_checkpoints is None:
        spare = left - (useful + 1) * block_bytes  # (what no block could use)
        ckpts += spare_checkpoints(spare, seqs, slot_bytes + (min_blocks - 1) * block_bytes)
        left, useful = after_slots(ckpts)
    # No more blocks than every slot and checkpoint could fill: a bigger budget is not taken.
    blocks = min(left // block_bytes - 1, useful) if block_bytes else useful
    if st.num_kv_blocks is not None:
        if st.num_kv_blocks < min_blocks - 1:
            raise ConfigError(
                f"num_kv_blocks={st.num_kv_blocks} cannot hold one {max_len}-token "
                f"sequence ({min_blocks - 1} blocks of {st.block_size})"
            )
        blocks = st.num_kv_blocks
    note = "; ".join(notes)
    if note:
        log.warning(note)
    return Capacity(seqs, max_len, max(blocks, min_blocks - 1), st.block_size, ckpts, note)


def spare_checkpoints(spare_bytes: int, seqs: int, per_extra: int) -> int:
    """More checkpoints, up to `SPARE_PER_SEQ` per slot, from `spare_bytes` no block could use
    (each costing `per_extra`: its slot and a whole sequence's blocks beside it). Prompts that
    share a prefix need one checkpoint there, and every prompt and finished sequence leaves two or
    three of its own: with only one per slot, a server with a few dozen system prompts evicts the
    checkpoints they share."""
    return max(0, min(SPARE_PER_SEQ * seqs, spare_bytes // max(per_extra, 1)))


def pool_bytes(cap: Capacity, plan: StagePlan) -> int:
    """What one stage's state pool takes (the probe's slot and block included)."""
    slots = (cap.max_num_seqs + 1 + cap.num_checkpoints) * plan.mamba_state_bytes
    return slots + (cap.num_blocks + 1) * cap.block_size * plan.kv_bytes_per_token


def format_capacity(cap: Capacity) -> str:
    """The line `plan --config` prints under the fit table."""
    at = " / ".join(
        str(cap.concurrent(n)) if n <= cap.max_model_len else "-" for n in (1024, 32768, 262144)
    )
    return (
        f"capacity: {cap.max_num_seqs} Mamba slots, {cap.num_blocks} KV blocks of "
        f"{cap.block_size} tokens, {cap.num_checkpoints} prefix checkpoints; concurrent "
        f"sequences at 1K / 32K / 256K tokens: {at} (max_model_len {cap.max_model_len})"
    )
