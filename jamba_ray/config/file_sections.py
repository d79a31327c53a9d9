"""The sections of a pipeline YAML: pydantic mirrors of the config tree, validated at this edge.

Each model mirrors one dataclass of `engine_config.py` field for field, under the same names, and
reads its defaults from it (an option left out of a file is the engine's default). The choices
are the tree's tuples. `to_config()` builds the frozen dataclass.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine_config import (
    AUTOSCALING_TARGETS,
    BACKENDS,
    BALANCES,
    QUANTIZATIONS,
    ROUTERS,
    STRATEGIES,
    TRANSPORTS,
    AutoscalingConfig,
    ComputeConfig,
    EngineAutoscalingConfig,
    EngineConfig,
    IngressConfig,
    ModelConfig,
    PlacementConfig,
    RecoveryConfig,
    RouterConfig,
    SchedulerConfig,
    ServeConfig,
    StateConfig,
    default_of,
)
from .spec import canonical_dtype


class Section(BaseModel):
    """A mirror of the dataclass `mirrors`; unknown keys are refused by name."""

    model_config = ConfigDict(extra="forbid")
    mirrors: ClassVar[type]

    def to_config(self, **given: Any):
        values = {k: getattr(self, k) for k in type(self).model_fields if k not in given}
        built = {k: v.to_config() if isinstance(v, Section) else v for k, v in values.items()}
        return self.mirrors(**built, **given)


def _d(cls: type, name: str, **checks: Any) -> Any:
    """A field whose default is the dataclass's."""
    return Field(default_of(cls, name), **checks)


class ModelSection(Section):
    mirrors: ClassVar[type] = ModelConfig
    path: str | None = Field(None, description="checkpoint dir or hub id; null: the tiny default")
    dtype: str = _d(ModelConfig, "dtype")
    quantization: Literal[QUANTIZATIONS] | None = _d(
        ModelConfig, "quantization", description="weight-only; Mamba stays unquantized"
    )
    max_model_len: int | None = _d(ModelConfig, "max_model_len", ge=1)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return canonical_dtype(v)


class StateSection(Section):
    mirrors: ClassVar[type] = StateConfig
    state_memory_gib: float = _d(
        StateConfig, "state_memory_gib", gt=0, description="per stage, Mamba state + KV"
    )
    block_size: int = _d(StateConfig, "block_size", ge=1)
    enable_prefix_caching: bool = _d(StateConfig, "enable_prefix_caching")
    checkpoint_every: int = _d(StateConfig, "checkpoint_every", ge=1)
    num_checkpoints: int | None = _d(StateConfig, "num_checkpoints", ge=0)
    num_kv_blocks: int | None = _d(StateConfig, "num_kv_blocks", ge=1)
    gpu_memory_utilization: float | None = _d(StateConfig, "gpu_memory_utilization", gt=0, le=1)
    prefix_tier: bool = _d(StateConfig, "prefix_tier", description="cluster prefix tier")
    prefix_tier_bytes: int = _d(StateConfig, "prefix_tier_bytes", ge=1)
    prefix_tier_min_tokens: int = _d(StateConfig, "prefix_tier_min_tokens", ge=1)


class SchedulerSection(Section):
    mirrors: ClassVar[type] = SchedulerConfig
    max_num_seqs: int = _d(SchedulerConfig, "max_num_seqs", ge=1, description="slots per stage")
    max_batched_tokens: int | None = _d(
        SchedulerConfig,
        "max_batched_tokens",
        ge=1,
        description="tokens per micro-batch; null: 2048 on CPU stages, 8192 on GPU stages",
    )
    max_waiting: int = _d(
        SchedulerConfig, "max_waiting", ge=1, description="queued requests before 429"
    )


class PlacementSection(Section):
    mirrors: ClassVar[type] = PlacementConfig
    num_stages: int = _d(PlacementConfig, "num_stages", ge=1)
    stage_slices: tuple[tuple[int, int], ...] | None = _d(
        PlacementConfig, "stage_slices", description="explicit [start, end) layer slices"
    )
    balance: Literal[BALANCES] = _d(PlacementConfig, "balance")
    num_cpus_per_stage: float | None = _d(
        PlacementConfig, "num_cpus_per_stage", ge=0, description="null: a share of what is free"
    )
    num_gpus_per_stage: float = _d(PlacementConfig, "num_gpus_per_stage", ge=0)
    strategy: Literal[STRATEGIES] = _d(PlacementConfig, "strategy")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per stage"
    )
    accelerator_type: str | None = _d(PlacementConfig, "accelerator_type")
    device_memory_gib: float | None = _d(PlacementConfig, "device_memory_gib", gt=0)
    activation_memory_gib: float = _d(PlacementConfig, "activation_memory_gib", ge=0)
    in_current_group: bool = _d(PlacementConfig, "in_current_group")
    ready_timeout_s: float = _d(PlacementConfig, "ready_timeout_s", gt=0)
    backend: Literal[BACKENDS] = _d(PlacementConfig, "backend")

    def to_config(self, **given: Any) -> PlacementConfig:
        return super().to_config(resources=tuple(sorted(self.resources.items())), **given)


class ComputeSection(Section):
    mirrors: ClassVar[type] = ComputeConfig
    threads_per_stage: int | None = _d(
        ComputeConfig, "threads_per_stage", ge=1, description="null: the pipeline's CPUs on a node"
    )
    transport: Literal[TRANSPORTS] = _d(
        ComputeConfig,
        "transport",
        description="auto: compiled (a Ray Compiled Graph) for 2+ GPU stages, else object_store",
    )
    decode_graphs: bool = _d(ComputeConfig, "decode_graphs", description="not with int8")


class RecoverySection(Section):
    mirrors: ClassVar[type] = RecoveryConfig
    max_stage_restarts: int = _d(RecoveryConfig, "max_stage_restarts", ge=0)
    recovery_snapshots: bool = _d(RecoveryConfig, "recovery_snapshots")


class EngineSection(Section):
    mirrors: ClassVar[type] = EngineConfig
    model: ModelSection = Field(default_factory=ModelSection)
    state: StateSection = Field(default_factory=StateSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    placement: PlacementSection = Field(default_factory=PlacementSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    recovery: RecoverySection = Field(default_factory=RecoverySection)

    def to_config(self, path: str) -> EngineConfig:
        return super().to_config(model=self.model.to_config(path=path))


class AutoscalingSection(Section):
    mirrors: ClassVar[type] = AutoscalingConfig
    min_replicas: int = _d(AutoscalingConfig, "min_replicas", ge=0)
    max_replicas: int = _d(AutoscalingConfig, "max_replicas", ge=1)
    initial_replicas: int | None = _d(AutoscalingConfig, "initial_replicas", ge=0)
    target_ongoing_requests: float = _d(
        AutoscalingConfig, "target_ongoing_requests", gt=0, description="per replica (pipeline)"
    )
    upscale_delay_s: float = _d(AutoscalingConfig, "upscale_delay_s", ge=0)
    downscale_delay_s: float = _d(AutoscalingConfig, "downscale_delay_s", ge=0)
    look_back_period_s: float | None = _d(AutoscalingConfig, "look_back_period_s", gt=0)


class EngineAutoscalingSection(AutoscalingSection):
    mirrors: ClassVar[type] = EngineAutoscalingConfig
    target: Literal[AUTOSCALING_TARGETS] = _d(
        EngineAutoscalingConfig,
        "target",
        description="what each replica is kept at target_value of",
    )
    target_value: float | None = _d(
        EngineAutoscalingConfig,
        "target_value",
        gt=0,
        description="per replica (not ongoing_requests)",
    )


class RouterSection(Section):
    mirrors: ClassVar[type] = RouterConfig
    policy: Literal[ROUTERS] = _d(
        RouterConfig, "policy", description="prefix: by the prefix replicas hold; default: Serve's"
    )
    imbalance_threshold: float = _d(
        RouterConfig, "imbalance_threshold", ge=0, description="ongoing requests over the least"
    )
    stats_period_s: float = _d(RouterConfig, "stats_period_s", gt=0)
    recent_ttl_s: float = _d(RouterConfig, "recent_ttl_s", ge=0)


class IngressSection(Section):
    mirrors: ClassVar[type] = IngressConfig
    num_cpus: float = _d(IngressConfig, "num_cpus", ge=0, description="per ingress replica")
    autoscaling: AutoscalingSection = Field(
        default_factory=AutoscalingSection, description="ingress replicas (no GPU, no stages)"
    )


class ServeSection(Section):
    mirrors: ClassVar[type] = ServeConfig
    host: str = _d(ServeConfig, "host")
    port: int = _d(ServeConfig, "port", ge=1, le=65535)
    grpc_port: int | None = _d(ServeConfig, "grpc_port", ge=1, le=65535, description="null: off")
    served_model_name: str | None = _d(ServeConfig, "served_model_name")
    max_body_bytes: int = _d(ServeConfig, "max_body_bytes", gt=0)
    max_prompt_tokens: int | None = _d(ServeConfig, "max_prompt_tokens", gt=0)
    max_tokens_limit: int | None = _d(ServeConfig, "max_tokens_limit", gt=0)
    request_timeout_s: float = _d(ServeConfig, "request_timeout_s", gt=0)
    api_key_env: str | None = _d(
        ServeConfig, "api_key_env", description="env var holding the API key (null: no auth)"
    )
    replica_cpus: float = _d(ServeConfig, "replica_cpus", ge=0)
    graceful_shutdown_timeout_s: float = _d(ServeConfig, "graceful_shutdown_timeout_s", gt=0)
    health_check_period_s: float = _d(ServeConfig, "health_check_period_s", gt=0)
    autoscaling: EngineAutoscalingSection = Field(
        default_factory=EngineAutoscalingSection, description="engine replicas (pipelines)"
    )
    router: RouterSection = Field(default_factory=RouterSection)
    ingress: IngressSection = Field(default_factory=IngressSection)
