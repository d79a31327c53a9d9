"""The partition planner: pure arithmetic on config.json, no weights."""

from pathlib import Path

import pytest

from jamba_ray.config import ModelSpec
from jamba_ray.config.planner import format_plan, plan, split_balanced, total_params
from jamba_ray.errors import ConfigError

JAMBA = Path(__file__).parents[2] / "pipelines" / "jamba-v0.1-config.json"


def test_jamba_v01_totals_match_the_published_size():
    spec = ModelSpec.from_path(JAMBA)
    assert total_params(spec) == 51_570_323_328
    for stages in (1, 2, 4, 8):
        assert sum(s.params for s in plan(spec, stages, dtype="bf16")) == total_params(spec)


def test_jamba_v01_four_stages_of_eight_layers():
    spec = ModelSpec.from_path(JAMBA)
    stages = plan(spec, 4, dtype="bf16")
    assert [(s.start, s.end) for s in stages] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert abs(stages[1].param_bytes / 2**30 - 23.76) < 0.01
    assert sum(s.kv_bytes_per_token for s in stages) == 16 * 1024
    assert abs(sum(s.mamba_state_bytes for s in stages) / 2**20 - 15.75) < 1e-9


def test_layer_kinds_follow_period_and_offset():
    spec = ModelSpec.from_path(JAMBA)
    assert [i for i in range(32) if spec.is_attention(i)] == [4, 12, 20, 28]
    assert all(spec.is_moe(i) == (i % 2 == 1) for i in range(32))


def test_split_is_contiguous_and_minimises_the_largest_stage():
    assert split_balanced([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert split_balanced([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert split_balanced([1, 2, 3], 3) == [(0, 1), (1, 2), (2, 3)]


def test_flops_balance_and_explicit_slices():
    spec = ModelSpec.from_path(JAMBA)
    by_flops = plan(spec, 4, balance="flops")
    assert by_flops[0].start == 0 and by_flops[-1].end == 32
    explicit = plan(spec, slices=[(0, 5), (5, 32)])
    assert [(s.start, s.end) for s in explicit] == [(0, 5), (5, 32)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stages=33), "more stages than layers"),
        (dict(stages=0), "at least 1"),
        (dict(slices=[(0, 4), (5, 32)]), "contiguous"),
        (dict(slices=[(0, 4), (4, 30)]), "cover 30 layers"),
    ],
)
def test_bad_layouts_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan(ModelSpec.from_path(JAMBA), **kwargs)


def test_non_jamba_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ConfigError, match="not a Jamba config"):
        ModelSpec.from_path(tmp_path)


def test_table_names_every_layer_kind():
    spec = ModelSpec.from_path(JAMBA)
    table = format_plan(spec, plan(spec, 4, dtype="bf16"))
    assert "4:A/MLP" in table and "1:M/MoE" in table and "51.57B" in table


def test_plan_cli_on_the_shipped_config(capsys):
    from jamba_ray.cli import main

    assert main(["plan", "--model", str(JAMBA), "--stages", "4", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "23.76 GiB" in out and "51.57B" in out
    assert main(["plan", "--model", str(JAMBA), "--stages", "40"]) == 2
