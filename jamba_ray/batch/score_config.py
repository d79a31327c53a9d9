"""`ScoreConfig`: an offline scoring job is an `EngineConfig` plus the job's own fields. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..config.engine_config import EngineConfig
from ..errors import InvalidRequestError

TASKS = ("loglik", "classify", "generate")
TOO_LONG = ("error", "truncate")  # an over-long row: an error row, or its text cut to fit
BATCH_SIZE = 16  # rows per map_batches call (and per Ray Data block)
Task = Literal[TASKS]


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    engine: EngineConfig  # the pipeline each pool actor drives; its defaults are the engine's
    task: Task = "loglik"
    text_column: str = "text"
    id_column: str = "id"
    too_long: Literal[TOO_LONG] = "error"
    token_logprobs: bool = False
    sampling: dict = field(default_factory=dict)  # generate: SamplingParams fields

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InvalidRequestError(f"unknown task {self.task!r}: use one of {TASKS}")
        if self.too_long not in TOO_LONG:
            raise InvalidRequestError(f"too_long must be one of {TOO_LONG}, got {self.too_long!r}")
        from ..engine.sampling_params import SamplingParams

        SamplingParams(**self.sampling)  # fail on bad flags before any actor starts

    @classmethod
    def build(cls, model: str, **options: Any) -> ScoreConfig:
        """Job fields and flat engine options in one call, as `LLM(model, **options)` takes them:
        `ScoreConfig.build("DIR", task="classify", num_stages=2)`."""
        job = {f.name for f in fields(cls)} - {"engine"}
        mine = {k: options.pop(k) for k in list(options) if k in job}
        return cls(EngineConfig.build(model, **options), **mine)

    @property
    def model(self) -> str:
        return self.engine.model.path
