"""Settings and planning: the config tree, the model spec, stage partitions, capacity and fit."""

from .engine_config import (
    AutoscalingConfig,
    ComputeConfig,
    EngineConfig,
    ModelConfig,
    PipelineConfig,
    PlacementConfig,
    RecoveryConfig,
    SchedulerConfig,
    ServeConfig,
    StateConfig,
)
from .score_config import ScoreConfig
from .spec import ModelSpec, canonical_dtype, dtype_bytes

__all__ = [
    "AutoscalingConfig",
    "ComputeConfig",
    "EngineConfig",
    "ModelConfig",
    "PipelineConfig",
    "PlacementConfig",
    "RecoveryConfig",
    "SchedulerConfig",
    "ServeConfig",
    "StateConfig",
    "ScoreConfig",
    "ModelSpec",
    "canonical_dtype",
    "dtype_bytes",
]
