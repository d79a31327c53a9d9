"""`pipelines/*.yaml`: a declarative pipeline layout, validated with pydantic at this edge only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import EngineConfig, canonical_dtype
from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageResources(_Strict):
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per stage actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per stage actor (1 in production)")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. A100-80G")
    device_memory_gib: float | None = Field(None, gt=0, description="memory of each stage's device, GiB")
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per stage")


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0, description="per replica (= per pipeline)")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float | None = Field(None, gt=0, description="window for averaging load")

    def serve_dict(self) -> dict:
        d = self.model_dump(exclude_none=True)
        if d["max_replicas"] < d["min_replicas"]:
            raise ConfigError("autoscaling.max_replicas must be at least min_replicas")
        return d


class ServeOptions(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int | None = Field(None, ge=1, le=65535, description="enable Serve's gRPC proxy here")
    served_model_name: str | None = None
    max_body_bytes: int = Field(1 << 20, gt=0)
    max_prompt_tokens: int | None = Field(None, gt=0)
    max_tokens_limit: int | None = Field(None, gt=0, description="largest max_tokens a request may ask")
    max_waiting: int = Field(256, ge=1, description="queued requests per replica before 429")
    request_timeout_s: float = Field(600.0, gt=0)
    api_key_env: str | None = Field(None, description="env var holding the API key (unset: no auth)")
    replica_cpus: float = Field(0.5, ge=0, description="CPUs for the replica (ingress + engine) itself")


class PipelineFile(_Strict):
    name: str
    model: str | None = Field(None, description="checkpoint dir or hub id; null: the tiny default")
    config_json: str | None = Field(None, description="config.json for planning when the model is not local "
                                    "(relative to this file)")
    dtype: str = "float32"
    stages: int | list[tuple[int, int]] = Field(1, description="count, or explicit [start, end) slices")
    balance: Literal["params", "flops"] = "params"
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    resources: StageResources = Field(default_factory=StageResources)
    max_num_seqs: int = Field(64, ge=1, description="state slots per stage")
    max_model_len: int | None = Field(None, ge=1)
    max_batched_tokens: int = Field(512, ge=1, description="tokens per micro-batch (prefill chunk)")
    state_memory_gib: float = Field(4.0, gt=0, description="per stage, for Mamba state + KV")
    activation_memory_gib: float = Field(0.5, ge=0, description="per stage, activations headroom")
    quantization: Literal["int8"] | None = Field(None, description="weight-only; Mamba stays unquantized")
    threads_per_stage: int = Field(1, ge=1)
    transport: Literal["auto", "object_store", "p2p"] = Field(
        "auto", description="hidden states between stages: p2p = NCCL (GPU) / gloo (CPU) "
        "point-to-point; auto = p2p on GPUs, object store on CPUs")
    max_stage_restarts: int = Field(3, ge=0, description="stage replacements per failure before 503s")
    decode_graphs: bool = Field(False, description="decode at fixed shapes, captured as CUDA graphs on GPUs "
                                "(on CPUs the same path runs eagerly); not with int8")
    sample_on: Literal["last_stage", "driver"] = Field(
        "last_stage", description="where next tokens are sampled: on the last stage, which then sends "
        "tokens instead of [rows, vocab] logits, or on the driver")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    serve: ServeOptions = Field(default_factory=ServeOptions)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return canonical_dtype(v)

    @classmethod
    def default(cls) -> PipelineFile:
        """The built-in layout (`pipelines/tiny-cpu.yaml` states the same): tiny model, 2 CPU stages."""
        return cls(
            name="tiny-cpu", stages=2, resources=StageResources(num_cpus=0.5), max_num_seqs=32,
            max_model_len=1024, max_batched_tokens=256, state_memory_gib=1, threads_per_stage=2,
            autoscaling=Autoscaling(target_ongoing_requests=16), serve=ServeOptions(grpc_port=9000),
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
            raise ConfigError(_explain(e)) from None

    @classmethod
    def load(cls, path: str | Path) -> PipelineFile:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"no pipeline file at {p}")
        try:
            loaded = cls.model_validate(yaml.safe_load(p.read_text()) or {})
        except ValidationError as e:
            raise ConfigError(f"{p}: {_explain(e)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if loaded.config_json:
            loaded = loaded.model_copy(update={"config_json": str((p.parent / loaded.config_json).resolve())})
        return loaded

    def model_spec_source(self) -> str:
        """Where `plan` reads config.json: a local model dir, else `config_json`."""
        from pathlib import Path as _P

        if self.model and _P(self.model).expanduser().is_dir():
            return self.model
        if self.config_json:
            return self.config_json
        if self.model is None:
            from .tiny import ensure_default_tiny

            return str(ensure_default_tiny())
        raise ConfigError(f"model {self.model!r} is not a local directory; set config_json to plan it offline")

    def engine_config(self, model: str) -> EngineConfig:
        slices = None if isinstance(self.stages, int) else tuple(tuple(s) for s in self.stages)
        r = self.resources
        custom = dict(r.custom)
        if r.accelerator_type:
            custom[f"accelerator_type:{r.accelerator_type}"] = 0.001
        return EngineConfig(
            model=model, num_stages=self.stages if isinstance(self.stages, int) else len(self.stages),
            stage_slices=slices, balance=self.balance, dtype=self.dtype, max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len, max_batched_tokens=self.max_batched_tokens,
            state_memory_gib=self.state_memory_gib, num_cpus_per_stage=r.num_cpus,
            num_gpus_per_stage=r.num_gpus, placement_strategy=self.placement,
            stage_resources=tuple(sorted(custom.items())), threads_per_stage=self.threads_per_stage,
            max_waiting=self.serve.max_waiting, quantization=self.quantization,
            device_memory_gib=r.device_memory_gib, activation_memory_gib=self.activation_memory_gib,
            max_stage_restarts=self.max_stage_restarts, transport=self.transport,
            decode_graphs=self.decode_graphs, sample_on=self.sample_on,
        )


def _explain(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"field '{where}': {err['msg']}")
    return "; ".join(parts)
