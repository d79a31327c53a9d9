"""`pipelines/*.yaml`: the pydantic mirror of the config tree, validated at this edge only.

Defaults are read from the dataclasses in `engine_config.py` (each option is defined there once);
`to_config()` turns a validated file into the frozen `PipelineConfig` the rest of the code uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
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
from .engine_config import default_of as d
from .spec import canonical_dtype


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageResources(_Strict):
    num_cpus: float | None = Field(
        d(PlacementConfig, "num_cpus_per_stage"),
        ge=0,
        description="CPUs per stage actor (null: a share of what is free)",
    )
    num_gpus: float = Field(
        d(PlacementConfig, "num_gpus_per_stage"),
        ge=0,
        description="GPUs per stage actor (1 in production)",
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. A100-80G")
    device_memory_gib: float | None = Field(
        d(PlacementConfig, "device_memory_gib"),
        gt=0,
        description="memory of each stage's device, GiB",
    )
    custom: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per stage"
    )


class Autoscaling(_Strict):
    min_replicas: int = Field(d(AutoscalingConfig, "min_replicas"), ge=0)
    max_replicas: int = Field(d(AutoscalingConfig, "max_replicas"), ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(
        d(AutoscalingConfig, "target_ongoing_requests"),
        gt=0,
        description="per replica (= per pipeline)",
    )
    upscale_delay_s: float = Field(d(AutoscalingConfig, "upscale_delay_s"), ge=0)
    downscale_delay_s: float = Field(d(AutoscalingConfig, "downscale_delay_s"), ge=0)
    look_back_period_s: float | None = Field(None, gt=0, description="window for averaging load")


class ServeOptions(_Strict):
    host: str = d(ServeConfig, "host")
    port: int = Field(d(ServeConfig, "port"), ge=1, le=65535)
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="enable Serve's gRPC proxy here"
    )
    served_model_name: str | None = None
    max_body_bytes: int = Field(d(ServeConfig, "max_body_bytes"), gt=0)
    max_prompt_tokens: int | None = Field(None, gt=0)
    max_tokens_limit: int | None = Field(
        None, gt=0, description="largest max_tokens a request may ask"
    )
    max_waiting: int = Field(
        d(SchedulerConfig, "max_waiting"),
        ge=1,
        description="queued requests per replica before 429",
    )
    request_timeout_s: float = Field(d(ServeConfig, "request_timeout_s"), gt=0)
    api_key_env: str | None = Field(
        None, description="env var holding the API key (unset: no auth)"
    )
    replica_cpus: float = Field(
        d(ServeConfig, "replica_cpus"),
        ge=0,
        description="CPUs for the replica (ingress + engine) itself",
    )
    graceful_shutdown_timeout_s: float = Field(
        d(ServeConfig, "graceful_shutdown_timeout_s"),
        gt=0,
        description="on scale-down or redeploy, how long in-flight streams may take to finish",
    )
    health_check_period_s: float = Field(d(ServeConfig, "health_check_period_s"), gt=0)


class PipelineFile(_Strict):
    name: str
    model: str | None = Field(None, description="checkpoint dir or hub id; null: the tiny default")
    config_json: str | None = Field(
        None,
        description="config.json for planning when the model is not local (relative to this file)",
    )
    dtype: str = d(ModelConfig, "dtype")
    stages: int | list[tuple[int, int]] = Field(
        d(PlacementConfig, "num_stages"), description="count, or explicit [start, end) slices"
    )
    balance: Literal["params", "flops"] = d(PlacementConfig, "balance")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = d(
        PlacementConfig, "strategy"
    )
    resources: StageResources = Field(default_factory=StageResources)
    max_num_seqs: int = Field(
        d(SchedulerConfig, "max_num_seqs"), ge=1, description="state slots per stage"
    )
    max_model_len: int | None = Field(None, ge=1)
    max_batched_tokens: int = Field(
        d(SchedulerConfig, "max_batched_tokens"),
        ge=1,
        description="tokens per micro-batch (prefill chunk)",
    )
    state_memory_gib: float = Field(
        d(StateConfig, "state_memory_gib"), gt=0, description="per stage, for Mamba state + KV"
    )
    activation_memory_gib: float = Field(
        d(PlacementConfig, "activation_memory_gib"),
        ge=0,
        description="per stage, activations headroom",
    )
    quantization: Literal["int8"] | None = Field(
        None, description="weight-only; Mamba stays unquantized"
    )
    threads_per_stage: int = Field(d(ComputeConfig, "threads_per_stage"), ge=1)
    transport: Literal["auto", "object_store", "p2p"] = Field(
        d(ComputeConfig, "transport"),
        description="hidden states between stages: p2p = NCCL (GPU) / "
        "gloo (CPU) point-to-point; auto = p2p on GPUs, object store on CPUs",
    )
    max_stage_restarts: int = Field(
        d(RecoveryConfig, "max_stage_restarts"),
        ge=0,
        description="stage replacements per failure before 503s",
    )
    recovery_snapshots: bool = Field(
        d(RecoveryConfig, "recovery_snapshots"),
        description="stages export Mamba checkpoints and full KV blocks as they are made; a "
        "replaced stage imports them and sequences replay only since their last checkpoint",
    )
    decode_graphs: bool = Field(
        d(ComputeConfig, "decode_graphs"),
        description="decode at fixed shapes, captured as CUDA graphs on GPUs; not with int8",
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    serve: ServeOptions = Field(default_factory=ServeOptions)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return canonical_dtype(v)

    @classmethod
    def default(cls) -> PipelineFile:
        """The built-in layout (`pipelines/tiny-cpu.yaml` states the same): tiny model,
        2 CPU stages."""
        return cls(
            name="tiny-cpu",
            stages=2,
            resources=StageResources(num_cpus=0.5),
            max_num_seqs=32,
            max_model_len=1024,
            max_batched_tokens=256,
            state_memory_gib=1,
            threads_per_stage=2,
            autoscaling=Autoscaling(target_ongoing_requests=16),
            serve=ServeOptions(grpc_port=9000),
        )

    def with_overrides(self, **changes) -> PipelineFile:
        """CLI flags over the file: nested keys as 'serve.port', 'autoscaling.min_replicas'."""
        data = self.model_dump()
        for key, value in changes.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for k in parents:
                node = node[k]
            node[leaf] = value
        try:
            return type(self).model_validate(data)
        except ValidationError as e:
            raise ConfigError(explain(e)) from None

    @classmethod
    def load(cls, path: str | Path) -> PipelineFile:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"no pipeline file at {p}")
        try:
            loaded = cls.model_validate(yaml.safe_load(p.read_text()) or {})
        except ValidationError as e:
            raise ConfigError(f"{p}: {explain(e)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if loaded.config_json:
            resolved = str((p.parent / loaded.config_json).resolve())
            loaded = loaded.model_copy(update={"config_json": resolved})
        return loaded

    def model_spec_source(self) -> str:
        """Where `plan` reads config.json: a local model dir, else `config_json`."""
        if self.model and Path(self.model).expanduser().is_dir():
            return self.model
        if self.config_json:
            return self.config_json
        if self.model is None:
            from ..tiny import ensure_default_tiny

            return str(ensure_default_tiny())
        raise ConfigError(
            f"model {self.model!r} is not a local directory; set config_json to plan it offline"
        )

    def to_config(self, model: str | None = None) -> PipelineConfig:
        """The frozen tree; `model` overrides the file's (the tiny default when both are unset)."""
        path = model or self.model
        if path is None:
            from ..tiny import default_tiny_dir

            path = str(default_tiny_dir())
        return PipelineConfig(
            self.name,
            self._engine(path),
            self._serve(),
            model is not None or self.model is not None,
        )

    def _engine(self, path: str) -> EngineConfig:
        r = self.resources
        custom = dict(r.custom)
        if r.accelerator_type:
            custom[f"accelerator_type:{r.accelerator_type}"] = 0.001
        slices = None if isinstance(self.stages, int) else tuple(tuple(s) for s in self.stages)
        return EngineConfig(
            model=ModelConfig(path, self.dtype, self.quantization, self.max_model_len),
            state=StateConfig(self.state_memory_gib),
            scheduler=SchedulerConfig(
                self.max_num_seqs, self.max_batched_tokens, self.serve.max_waiting
            ),
            placement=PlacementConfig(
                self.stages if isinstance(self.stages, int) else len(self.stages),
                slices,
                self.balance,
                r.num_cpus,
                r.num_gpus,
                self.placement,
                tuple(sorted(custom.items())),
                r.device_memory_gib,
                self.activation_memory_gib,
            ),
            compute=ComputeConfig(self.threads_per_stage, self.transport, self.decode_graphs),
            recovery=RecoveryConfig(self.max_stage_restarts, self.recovery_snapshots),
        )

    def _serve(self) -> ServeConfig:
        s = self.serve.model_dump(exclude={"max_waiting"})
        return ServeConfig(**s, autoscaling=AutoscalingConfig(**self.autoscaling.model_dump()))


def explain(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"field '{where}': {err['msg']}")
    return "; ".join(parts)
