"""CLI flags map onto the pipeline layout the same way a YAML would."""

from pathlib import Path

import pytest

from jamba_ray.cli import build_parser, main
from jamba_ray.commands import pipeline_file as _pipeline
from jamba_ray.config.pipeline_file import PipelineFile

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
