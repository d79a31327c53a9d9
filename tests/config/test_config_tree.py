"""One config tree: a layout YAML nests `EngineConfig`'s and `ServeConfig`'s sections under their
own names, so every option of the tree can be set from a file; each set of choices is one tuple."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from jamba_ray.batch.score_config import TASKS, TOO_LONG, ScoreConfig
from jamba_ray.cli import build_parser
from jamba_ray.config import ModelConfig, file_sections
from jamba_ray.config import engine_config as tree
from jamba_ray.config.engine_config import EngineConfig, PipelineConfig, ServeConfig
from jamba_ray.config.pipeline_file import PipelineFile
from jamba_ray.errors import ConfigError, InvalidRequestError

# A value other than the default for every option of the tree (dataclass form), by its path in a
# layout. A new option fails the first test until it has one here, and so must reach the YAML.
SAMPLE = {
    "engine.model.path": "some/model",
    "engine.model.dtype": "bfloat16",
    "engine.model.quantization": "int8",
    "engine.model.max_model_len": 2048,
    "engine.state.state_memory_gib": 2.5,
    "engine.state.block_size": 32,
    "engine.state.enable_prefix_caching": False,
    "engine.state.checkpoint_every": 128,
    "engine.state.num_checkpoints": 7,
    "engine.state.num_kv_blocks": 99,
    "engine.state.gpu_memory_utilization": 0.8,
    "engine.state.prefix_tier": True,
    "engine.state.prefix_tier_bytes": 2**20,
    "engine.state.prefix_tier_min_tokens": 32,
    "engine.scheduler.max_num_seqs": 8,
    "engine.scheduler.max_batched_tokens": 128,
    "engine.scheduler.max_waiting": 10,
    "engine.placement.num_stages": 3,
    "engine.placement.stage_slices": ((0, 3), (3, 8)),
    "engine.placement.balance": "flops",
    "engine.placement.num_cpus_per_stage": 1.5,
    "engine.placement.num_gpus_per_stage": 1.0,
    "engine.placement.strategy": "SPREAD",
    "engine.placement.resources": (("disk", 2.0),),
    "engine.placement.accelerator_type": "A100-80G",
    "engine.placement.device_memory_gib": 80.0,
    "engine.placement.activation_memory_gib": 1.0,
    "engine.placement.in_current_group": True,
    "engine.placement.ready_timeout_s": 60.0,
    "engine.placement.backend": "local",
    "engine.compute.threads_per_stage": 4,
    "engine.compute.transport": "p2p",
    "engine.compute.decode_graphs": True,
    "engine.recovery.max_stage_restarts": 0,
    "engine.recovery.recovery_snapshots": False,
    "serve.host": "0.0.0.0",
    "serve.port": 8100,
    "serve.grpc_port": 9100,
    "serve.served_model_name": "jamba",
    "serve.max_body_bytes": 4096,
    "serve.max_prompt_tokens": 100,
    "serve.max_tokens_limit": 50,
    "serve.request_timeout_s": 30.0,
    "serve.api_key_env": "KEY",
    "serve.replica_cpus": 1.0,
    "serve.graceful_shutdown_timeout_s": 5.0,
    "serve.health_check_period_s": 2.0,
    "serve.autoscaling.min_replicas": 0,
    "serve.autoscaling.max_replicas": 3,
    "serve.autoscaling.initial_replicas": 2,
    "serve.autoscaling.target_ongoing_requests": 4.0,
    "serve.autoscaling.upscale_delay_s": 1.0,
    "serve.autoscaling.downscale_delay_s": 2.0,
    "serve.autoscaling.look_back_period_s": 3.0,
    "serve.autoscaling.target": "slots",
    "serve.autoscaling.target_value": 12.0,
    "serve.router.policy": "default",
    "serve.router.imbalance_threshold": 2.0,
    "serve.router.stats_period_s": 0.5,
    "serve.router.recent_ttl_s": 1.0,
    "serve.ingress.num_cpus": 2.0,
    "serve.ingress.autoscaling.min_replicas": 2,
    "serve.ingress.autoscaling.max_replicas": 4,
    "serve.ingress.autoscaling.initial_replicas": 3,
    "serve.ingress.autoscaling.target_ongoing_requests": 64.0,
    "serve.ingress.autoscaling.upscale_delay_s": 3.0,
    "serve.ingress.autoscaling.downscale_delay_s": 60.0,
    "serve.ingress.autoscaling.look_back_period_s": 5.0,
}


def leaves(cls: type, prefix: str) -> dict[str, dataclasses.Field]:
    """Every option under a dataclass of the tree, by dotted path (sections walked into)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(leaves(hints[f.name], f"{prefix}.{f.name}"))
        else:
            out[f"{prefix}.{f.name}"] = f
    return out


TREE = {**leaves(EngineConfig, "engine"), **leaves(ServeConfig, "serve")}


def defaults() -> PipelineConfig:
    return PipelineConfig("x", EngineConfig(ModelConfig("M")), ServeConfig())


def with_leaf(node, path: list[str], value):
    """The dataclass tree `node` with the option at `path` set (checks re-run)."""
    head, *rest = path
    return dataclasses.replace(
        node, **{head: with_leaf(getattr(node, head), rest, value) if rest else value}
    )


def nested(path: str, value) -> dict:
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def as_yaml(path: str, value):
    """The file form of a dataclass value: resources as a mapping, tuples as lists."""
    if path.endswith(".resources"):
        return dict(value)
    if isinstance(value, tuple):
        return [as_yaml("", v) for v in value]
    return value


def test_the_sample_covers_every_option_of_the_tree_with_a_non_default_value():
    assert set(SAMPLE) == set(TREE)
    for path, f in TREE.items():
        if f.default is not dataclasses.MISSING:
            assert SAMPLE[path] != f.default, path


@pytest.mark.parametrize("path", sorted(SAMPLE))
def test_every_option_of_the_tree_is_set_from_a_yaml_under_its_own_path(path, tmp_path):
    layout = {"name": "x", "engine": {"model": {"path": "M"}}}
    value = as_yaml(path, SAMPLE[path])
    section, *rest = path.split(".")
    layout[section] = _merge(layout.get(section, {}), nested(".".join(rest), value))
    f = tmp_path / "layout.yaml"
    f.write_text(yaml.safe_dump(layout))
    got = PipelineFile.load(f).to_config()
    assert got == with_leaf(defaults(), path.split("."), SAMPLE[path])


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def test_a_layout_that_leaves_everything_out_is_the_trees_defaults():
    assert PipelineFile(name="x").to_config("M") == defaults()


def test_the_file_sections_have_the_names_of_the_dataclasses_they_mirror():
    for section in file_sections.Section.__subclasses__():
        names = {f.name for f in dataclasses.fields(section.mirrors)}
        assert set(section.model_fields) == names, section.__name__


def test_a_key_of_the_old_flat_layouts_is_refused_saying_where_it_is_now(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("name: x\nstages: 2\nmax_num_seqs: 8\n")
    with pytest.raises(ConfigError) as e:
        PipelineFile.load(p)
    assert "field 'stages'" in str(e.value) and "now engine.placement.num_stages" in str(e.value)
    assert "field 'max_num_seqs'" in str(e.value)
    assert "now engine.scheduler.max_num_seqs" in str(e.value)


def test_overrides_take_dotted_paths_or_flat_engine_names_and_refuse_others():
    p = PipelineFile.default().with_overrides(num_stages=3, **{"serve.autoscaling.max_replicas": 2})
    assert p.engine.placement.num_stages == 3 and p.serve.autoscaling.max_replicas == 2
    with pytest.raises(ConfigError, match="unknown engine option 'max_num_seq'"):
        PipelineFile.default().with_overrides(max_num_seq=3)
    with pytest.raises(ConfigError, match="field 'serve.prot'"):
        PipelineFile.default().with_overrides(**{"serve.prot": 1})


TRANSPORT_FLAGS = [("generate", "transport"), ("serve", "transport")]
# Each set of choices, the dataclass field that checks it, the YAML field and the CLI flags.
CHOICES = [
    (tree.TRANSPORTS, "engine.compute.transport", TRANSPORT_FLAGS),
    (tree.BALANCES, "engine.placement.balance", [("plan", "balance")]),
    (tree.BACKENDS, "engine.placement.backend", []),
    (tree.STRATEGIES, "engine.placement.strategy", []),
    (tree.QUANTIZATIONS, "engine.model.quantization", []),
]


def cli_action(command: str, dest: str):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return next(a for a in sub._actions if a.dest == dest)


@pytest.mark.parametrize("choices, path, flags", CHOICES, ids=[c[1] for c in CHOICES])
def test_each_set_of_engine_choices_is_one_tuple(choices, path, flags):
    for value in choices:  # the dataclass and the YAML take each one ...
        expected = with_leaf(defaults(), path.split("."), value)
        layout = PipelineFile(name="x").with_overrides(**{path: value})
        assert layout.to_config("M") == expected
    with pytest.raises(ConfigError):  # ... and refuse anything else
        with_leaf(defaults(), path.split("."), "other")
    with pytest.raises(ConfigError, match=f"field '{path}'"):
        PipelineFile(name="x").with_overrides(**{path: "other"})
    for command, dest in flags:
        assert tuple(cli_action(command, dest).choices) == choices


def test_the_score_jobs_choices_are_one_tuple_each():
    engine = EngineConfig(ModelConfig("M"))
    for field, choices, flag in [("task", TASKS, "task"), ("too_long", TOO_LONG, "too_long")]:
        for value in choices:
            assert getattr(ScoreConfig(engine, **{field: value}), field) == value
        with pytest.raises(InvalidRequestError):
            ScoreConfig(engine, **{field: "other"})
        assert tuple(cli_action("score", flag).choices) == choices


def test_the_tree_and_the_cli_that_reads_it_import_neither_torch_nor_ray():
    import subprocess
    import sys

    code = (
        "import sys; import jamba_ray.batch.score_config, jamba_ray.config.pipeline_file, "
        "jamba_ray.cli; "
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
