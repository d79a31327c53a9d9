"""State capacity per stage: Mamba slots and checkpoints first, the rest of the budget as KV
blocks shared by all sequences, so short sequences are not charged for max_model_len."""

import pytest

from jamba_ray.config import EngineConfig, ModelSpec
from jamba_ray.config.capacity import derive_capacity, per_stage, pool_bytes
from jamba_ray.config.planner import plan
from jamba_ray.errors import ConfigError
from tests.config.test_layouts import JAMBA


def test_capacity_is_clamped_to_the_state_budget_with_a_reason(tiny_ckpt):
    spec = ModelSpec.from_path(tiny_ckpt)
    cfg = EngineConfig.build(
        tiny_ckpt, max_num_seqs=1000, state_memory_gib=0.01, max_model_len=4096
    )
    plans = plan(spec, 2)
    cap = derive_capacity(spec, cfg, plans)
    assert cap.max_num_seqs < 1000 and cap.max_model_len == 2048
    assert "clamped" in cap.note and "budget" in cap.note
    assert all(pool_bytes(cap, p) <= 0.01 * 2**30 for p in plans)
    assert cap.concurrent(2048) >= 1


def test_paged_kv_holds_many_short_sequences_where_contiguous_kv_held_few():
    """Jamba-v0.1 sized, 4 stages, 32K max_model_len, 2 GiB of state per stage: reserving
    max_model_len of KV per sequence (as before paging) held 15 sequences; blocks hold all 64
    slots' 1K-token sequences, and still 12 at 32K beside the prefix checkpoints."""
    cfg = EngineConfig.build(
        "x", dtype="bf16", max_num_seqs=64, max_model_len=32768, state_memory_gib=2.0
    )
    plans = plan(JAMBA, 4, dtype="bf16")
    cap = derive_capacity(JAMBA, cfg, plans)
    contiguous = int(
        2 * 2**30 // max(p.mamba_state_bytes + 32768 * p.kv_bytes_per_token for p in plans)
    )
    assert contiguous == 15
    assert cap.concurrent(1024) == 64 and cap.concurrent(32768) >= 10  # (checkpoints cost some)


def test_a_kv_block_count_too_small_for_one_sequence_is_refused(tiny_ckpt):
    spec = ModelSpec.from_path(tiny_ckpt)
    cfg = EngineConfig.build(tiny_ckpt, max_model_len=128, num_kv_blocks=3)
    with pytest.raises(ConfigError, match="num_kv_blocks=3 cannot hold one 128-token sequence"):
        derive_capacity(spec, cfg, plan(spec, 1))


def test_a_measured_budget_replaces_the_stated_one(tiny_ckpt):
    """GPU stages measure what they can give to state (gpu_memory_utilization); the engine
    sizes every stage from the least of them."""
    spec = ModelSpec.from_path(tiny_ckpt)
    cfg = EngineConfig.build(tiny_ckpt, state_memory_gib=4.0, max_model_len=128, max_num_seqs=64)
    plans = plan(spec, 2)
    small = derive_capacity(spec, cfg, plans, budget_bytes=2**20)
    assert small.max_num_seqs < 64 and all(pool_bytes(small, p) <= 2**20 for p in plans)
    assert derive_capacity(spec, cfg, plans).max_num_seqs == 64
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        EngineConfig.build(tiny_ckpt, gpu_memory_utilization=1.5)


def test_budget_no_block_could_use_holds_more_prefix_checkpoints_within_the_budget(tiny_ckpt):
    """One checkpoint per slot runs out where prompts share prefixes (each prompt and each
    finished sequence leaves checkpoints of its own); a budget with room to spare holds up to 4
    more per slot, a tight one none, and an explicit `num_checkpoints` is kept."""
    spec = ModelSpec.from_path(tiny_ckpt)
    plans = plan(spec, 2)
    # (recovery snapshots are for Ray stages: local, one checkpoint per slot)
    roomy = EngineConfig.build(tiny_ckpt, max_model_len=128, max_num_seqs=8, backend="local")
    cap = derive_capacity(spec, roomy, plans)
    assert cap.num_checkpoints == 8 + 4 * 8
    assert all(pool_bytes(cap, p) <= 4 * 2**30 for p in plans)
    slot, block = per_stage(plans, 16)
    minimal = slot * (8 + 1 + 8) + 20 * block  # the slots, one checkpoint each, a few blocks
    tight = derive_capacity(spec, roomy, plans, budget_bytes=minimal)
    assert tight.num_checkpoints == 8 and all(pool_bytes(tight, p) <= minimal for p in plans)
    fixed = EngineConfig.build(tiny_ckpt, max_model_len=128, max_num_seqs=8, num_checkpoints=3)
    assert derive_capacity(spec, fixed, plans).num_checkpoints == 3
