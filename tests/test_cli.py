"""CLI flags map onto the pipeline layout the same way a YAML would."""

import json
import os
from pathlib import Path

import pytest

from jamba_ray.cli import build_parser, main
from jamba_ray.commands import pipeline_file as _pipeline
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
    assert p.stages == 3 and p.serve.port == 8123 and p.serve.host == "0.0.0.0"
    assert (p.autoscaling.min_replicas, p.autoscaling.max_replicas) == (2, 4)
    assert p.autoscaling.target_ongoing_requests == 5 and p.serve.api_key_env == "JAMBA_RAY_API_KEY"
    assert p.serve.grpc_port == 9000 and p.max_num_seqs == PipelineFile.default().max_num_seqs
    compute = p.to_config("m").engine.compute
    assert p.transport == "p2p" and compute.transport == "p2p" and compute.decode_graphs
    plain = _pipeline(build_parser().parse_args(["serve"]))
    assert plain.transport == "auto" and not plain.decode_graphs


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
    assert p.name == "jamba-v0.1-bf16-4x80g" and p.serve.port == 9001 and p.stages == 4
    bad = build_parser().parse_args(["serve", "--port", "70000"])
    with pytest.raises(Exception, match="serve.port"):
        _pipeline(bad)


def test_serve_config_prints_a_serve_config(capsys):
    assert main(["serve-config", "--config", str(ROOT / "pipelines" / "tiny-cpu.yaml")]) == 0
    out = capsys.readouterr().out
    assert "import_path: jamba_ray.serve.app:build_app" in out and "grpc_servicer_functions" in out


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
