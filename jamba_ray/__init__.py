"""jamba-ray: Jamba served as a pipeline of Ray stage actors."""

from .config.engine_config import EngineConfig
from .engine.sampling_params import SamplingParams
from .errors import (
    CapacityError,
    ConfigError,
    InvalidRequestError,
    JambaRayError,
    ModelNotFoundError,
    StageFailedError,
)
from .runtime import backends as _backends  # noqa: F401  (the engine's "ray" and "local")

__all__ = [
    "LLM",
    "AsyncEngine",
    "EngineConfig",
    "SamplingParams",
    "JambaRayError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "ConfigError",
    "CapacityError",
    "StageFailedError",
]


def __getattr__(name: str):
    # lazy: importing the package must not import ray or torch
    if name == "LLM":
        from .engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from .engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
