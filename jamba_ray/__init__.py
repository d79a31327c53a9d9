"""jamba-ray: Jamba served as a pipeline of Ray stage actors."""

from .errors import (
    CapacityError,
    ConfigError,
    InvalidRequestError,
    JambaRayError,
    ModelNotFoundError,
    StageFailedError,
)
from .sampling import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "JambaRayError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "ConfigError",
    "CapacityError",
    "StageFailedError",
]


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing the package must not import ray/torch
        from .llm import LLM

        return LLM
    raise AttributeError(name)
