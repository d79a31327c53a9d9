"""A scoring job is an `EngineConfig` plus its own fields: its engine defaults are the tree's."""

from __future__ import annotations

import dataclasses

import pytest

from jamba_ray.batch.score_config import ScoreConfig
from jamba_ray.config import EngineConfig, ModelConfig
from jamba_ray.config.engine_config import OPTION_SECTION
from jamba_ray.errors import ConfigError


def test_a_jobs_engine_defaults_are_the_engines():
    cfg = ScoreConfig.build("M")
    assert cfg.engine == EngineConfig.build("M") == EngineConfig(ModelConfig("M"))
    assert cfg == ScoreConfig(EngineConfig(ModelConfig("M"))) and cfg.model == "M"


def test_build_sends_job_fields_to_the_job_and_engine_options_to_the_engine():
    cfg = ScoreConfig.build("M", task="generate", num_stages=2, max_num_seqs=8, sampling={"n": 1})
    assert (cfg.task, cfg.sampling) == ("generate", {"n": 1})
    assert cfg.engine == EngineConfig.build("M", num_stages=2, max_num_seqs=8)
    with pytest.raises(ConfigError, match="unknown engine option 'max_num_seq'"):
        ScoreConfig.build("M", max_num_seq=8)


def test_no_job_field_shares_a_name_with_an_engine_option():
    jobs = {f.name for f in dataclasses.fields(ScoreConfig)} - {"engine"}
    assert not jobs & set(OPTION_SECTION)
