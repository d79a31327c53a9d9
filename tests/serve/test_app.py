"""Binding the Serve app: settings that would make it unsafe refuse it before any replica starts."""

from __future__ import annotations

import pytest

from jamba_ray.errors import ConfigError
from jamba_ray.serve.app import deployment
from tests.serve.conftest import pipeline_for_tests

KEY_ENV = "JAMBA_TEST_UNSET_API_KEY"


def test_an_api_key_variable_that_is_named_but_unset_refuses_to_deploy(tiny_ckpt, monkeypatch):
    """Failing open (serving with no key at all) is the one outcome that must never happen."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = pipeline_for_tests(**{"serve.api_key_env": KEY_ENV}).to_config(tiny_ckpt)
    with pytest.raises(ConfigError, match=KEY_ENV):
        deployment(config)
    monkeypatch.setenv(KEY_ENV, "")  # set but empty is no key either
    with pytest.raises(ConfigError, match=KEY_ENV):
        deployment(config)
    monkeypatch.setenv(KEY_ENV, "s3cret")
    assert deployment(config) is not None


def test_a_serve_config_without_a_layout_deploys_the_one_default_layout():
    """`build_app` (serve run / deploy, KubeRay) and `jamba-ray serve` without a file agree."""
    from pathlib import Path

    from jamba_ray.cli import build_parser
    from jamba_ray.commands import pipeline_file
    from jamba_ray.config.pipeline_file import PipelineFile
    from jamba_ray.serve.app import build_app

    default = PipelineFile.load(Path(__file__).parents[2] / "pipelines" / "tiny-cpu.yaml")
    assert PipelineFile.default() == default
    assert pipeline_file(build_parser().parse_args(["serve"])) == default
    bound = build_app({})._bound_deployment.init_args[0]  # what each replica is built from
    assert bound == default.to_config()
