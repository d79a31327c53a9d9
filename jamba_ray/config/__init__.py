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
    "ModelSpec",
    "canonical_dtype",
    "dtype_bytes",
]
