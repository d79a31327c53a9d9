"""CLI flags map onto the pipeline layout the same way a YAML would."""

import json
import os
from pathlib import Path

import pytest
import yaml

from jamba_ray.batch.score_config import ScoreConfig
from jamba_ray.cli import build_parser, main
from jamba_ray.commands import pipeline_file as _pipeline
from jamba_ray.config import EngineConfig
from jamba_ray.config.engine_config import OPTION_SECTION, option_default
from jamba_ray.config.pipeline_file import PipelineFile
from tests.conftest import STAGE_CPUS, assert_greedy_like_hf

ROOT = Path(__file__).parents[1]


def test_serve_flags_override_the_default_layout():
    args = build_parser().parse_args(
        [
            "serve",
            "--stages",
            "3",
            "--port",
            "8123",
            "--host",
            "0.0.0.0",
            "--min-replicas",
            "2",
            "--max-replicas",
            "4",
            "--target-ongoing-requests",
            "5",
            "--api-key",
            "k",
            "--transport",
            "p2p",
            "--decode-graphs",
        ]
    )
    p = _pipeline(args)
    scaling = p.serve.autoscaling
    assert p.engine.placement.num_stages == 3
    assert p.serve.port == 8123 and p.serve.host == "0.0.0.0"
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 4)
    assert scaling.target_ongoing_requests == 5 and p.serve.api_key_env == "JAMBA_RAY_API_KEY"
    default = PipelineFile.default()
    assert p.serve.grpc_port == 9000
    assert p.engine.scheduler.max_num_seqs == default.engine.scheduler.max_num_seqs
    compute = p.to_config("m").engine.compute
    assert p.engine.compute.transport == "p2p" and compute.transport == "p2p"
    assert compute.decode_graphs
    plain = _pipeline(build_parser().parse_args(["serve"]))
    assert plain.engine.compute.transport == "auto" and not plain.engine.compute.decode_graphs


def test_serve_flags_override_a_yaml_and_bad_values_are_named():
    args = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(ROOT / "pipelines" / "jamba-v0.1-bf16-4x80g.yaml"),
            "--port",
            "9001",
        ]
    )
    p = _pipeline(args)
    assert p.name == "jamba-v0.1-bf16-4x80g" and p.serve.port == 9001
    assert p.engine.placement.num_stages == 4
    bad = build_parser().parse_args(["serve", "--port", "70000"])
    with pytest.raises(Exception, match="serve.port"):
        _pipeline(bad)


def test_serve_stages_replace_a_layouts_explicit_slices(tmp_path):
    layout = tmp_path / "sliced.yaml"
    layout.write_text("name: s\nengine: {placement: {stage_slices: [[0, 3], [3, 8]]}}\n")
    sliced = build_parser().parse_args(["serve", "--config", str(layout)])
    assert _pipeline(sliced).to_config("m").engine.placement.num_stages == 2
    args = build_parser().parse_args(["serve", "--config", str(layout), "--stages", "4"])
    place = _pipeline(args).to_config("m").engine.placement
    assert (place.num_stages, place.stage_slices) == (4, None)


def test_serve_config_prints_a_serve_config(capsys):
    assert main(["serve-config", "--config", str(ROOT / "pipelines" / "tiny-cpu.yaml")]) == 0
    out = capsys.readouterr().out
    assert "import_path: jamba_ray.serve.app:build_app" in out and "grpc_servicer_functions" in out


def test_serve_with_two_configs_serves_two_models_and_the_flags_set_the_first(tmp_path, capsys):
    """One model per --config; flags and --model go to the first (its serve section is the
    app's); `serve-config` passes the files on as a list."""
    from jamba_ray.commands import serve_configs

    other = tmp_path / "b.yaml"
    other.write_text("name: b\nserve: {served_model_name: b, autoscaling: {max_replicas: 2}}\n")
    tiny = str(ROOT / "pipelines" / "tiny-cpu.yaml")
    argv = ["serve", "--config", tiny, "--config", str(other), "--port", "9001", "--stages", "3"]
    first, second = serve_configs(build_parser().parse_args(argv))
    assert first.serve.port == 9001 and first.engine.placement.num_stages == 3
    assert second.serve.served_model_name == "b" and second.serve.autoscaling.max_replicas == 2
    assert second.engine.placement.num_stages == option_default("num_stages")
    assert main(["serve-config", "--config", tiny, "--config", str(other)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"] == {
        "config": [tiny, str(other)]
    }


def test_generate_without_a_model_uses_the_tiny_default_and_prints_json_lines(capsys, ray_session):
    """The default model is made in $JAMBA_RAY_CACHE (the session's private one, not ~/.cache)."""
    from transformers import AutoTokenizer

    prompts = ["hello world", "The quick brown fox"]
    argv = ["generate", "--stages", "2", "--cpus-per-stage", str(STAGE_CPUS), "--max-tokens", "6"]
    assert main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    path = Path(os.environ["JAMBA_RAY_CACHE"]) / "tiny-default"
    tok = AutoTokenizer.from_pretrained(path)
    assert [line["prompt"] for line in lines] == prompts
    for line in lines:
        ids = line["token_ids"]
        assert_greedy_like_hf(str(path), tok(line["prompt"]).input_ids, ids)
        assert line["text"] == tok.decode(ids, skip_special_tokens=True)
        assert line["finish_reason"] == ("length" if len(ids) == 6 else "stop")


def test_generate_reports_a_bad_model_as_an_error_line_and_exit_code_2(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "jamba-ray: error:" in capsys.readouterr().err


def test_help_lists_every_command_and_the_plan_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(
        c in out for c in ["init-tiny", "plan", "generate", "serve", "score", "serve-config"]
    )
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "number of stages (default 1)" in out and "torch_dtype, else float32" in out


def test_plan_sizes_follow_the_checkpoint_dtype(tiny_ckpt, capsys):
    assert main(["plan", "--model", tiny_ckpt, "--stages", "2"]) == 0
    fp32 = capsys.readouterr().out
    assert "float32 weights, 2 stages" in fp32 and "2.21 MiB" in fp32  # 578,704 params x 4 B
    assert main(["plan", "--model", tiny_ckpt, "--stages", "2", "--dtype", "bf16"]) == 0
    assert "1.10 MiB" in capsys.readouterr().out
    real = str(ROOT / "pipelines" / "jamba-v0.1-config.json")
    assert main(["plan", "--model", real, "--stages", "4"]) == 0
    assert "bfloat16 weights, 4 stages" in capsys.readouterr().out


def test_init_tiny_says_what_it_does(tmp_path, capsys):
    assert main(["init-tiny", str(tmp_path / "t"), "--seed", "2"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no shard progress bar
    steps = [line for line in out.splitlines() if line.startswith("init-tiny: ")]
    assert len(steps) == 3 and "tokenizer" in steps[-1]
    assert f"wrote a tiny Jamba checkpoint to {tmp_path / 't'}" in out


# CLI flags that set an engine option under another name than the option's.
FLAG_OPTIONS = {"stages": "num_stages", "cpus_per_stage": "num_cpus_per_stage"}


def subcommand(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", ["plan", "generate", "score"])
def test_engine_flags_default_to_the_trees_defaults(command):
    """As `LLM(model)` does: a flag left out is `EngineConfig`'s default (plan's --dtype excepted:
    it sizes the checkpoint's own dtype)."""
    checked = 0
    for action in subcommand(command)._actions:
        option = FLAG_OPTIONS.get(action.dest, action.dest)
        if (command, option) == ("plan", "dtype") or option not in OPTION_SECTION:
            continue
        assert action.default == option_default(option), (command, action.dest)
        checked += 1
    assert checked >= 2


def test_score_without_flags_runs_the_engine_defaults_and_the_jobs_defaults():
    from jamba_ray.commands import score_config

    args = build_parser().parse_args(["score", "--model", "m", "--input", "i", "--output", "o"])
    cfg = score_config(args)
    assert cfg.engine == EngineConfig.build("m")
    job = ScoreConfig(cfg.engine, sampling=cfg.sampling)  # the CLI's sampling is greedy
    assert cfg == job


def test_serve_flags_default_to_the_layout_and_serve_alone_runs_the_default_layout():
    serve = subcommand("serve")
    flags = [a for a in serve._actions if a.dest not in ("help", "fn")]
    assert all(a.default in (None, False) for a in flags)  # unset: the layout's value stays
    assert _pipeline(build_parser().parse_args(["serve"])) == PipelineFile.default()


def test_score_retry_flags():
    base = ["score", "--model", "m", "--input", "i", "--output", "o"]
    assert build_parser().parse_args(base).retry_errors is True
    assert build_parser().parse_args([*base, "--no-retry-errors"]).retry_errors is False


def test_every_option_of_every_command_says_what_it_does():
    import argparse

    commands = build_parser()._subparsers._group_actions[0].choices
    silent = [
        f"{name} {a.option_strings[0] if a.option_strings else a.dest}"
        for name, sub in commands.items()
        for a in sub._actions
        if not a.help and not isinstance(a, argparse._HelpAction)
    ]
    assert silent == []


def test_plan_of_an_int8_layout_gives_one_weight_size_per_stage(capsys):
    layout = str(ROOT / "pipelines" / "jamba-v0.1-int8-2x80g.yaml")
    assert main(["plan", "--config", layout]) == 0
    out = capsys.readouterr().out
    assert out.count("25.66 GiB") == 4 and "48.03 GiB" not in out  # partition + fit tables
