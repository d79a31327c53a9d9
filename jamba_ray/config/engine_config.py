"""One tree of frozen settings: each option is defined once, here, with its one default.
Pure Python.

`EngineConfig` nests the sections an engine needs; `PipelineConfig` adds the Serve front. The
pipeline YAML (`file_sections.py`, `pipeline_file.py`) nests the same sections under the same
names, `ScoreConfig` is an `EngineConfig` plus job fields, and `LLM(...)` and the CLI take their
defaults from here (`EngineConfig.build(model, **flat)` takes vLLM-style flat names). Each set of
choices is one tuple below, which the dataclasses, the YAML and the CLI all check against.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigError
from .serve_config import (  # noqa: F401  (the Serve part of the tree, re-exported)
    AUTOSCALING_TARGETS,
    ROUTERS,
    AutoscalingConfig,
    EngineAutoscalingConfig,
    IngressConfig,
    RouterConfig,
    ServeConfig,
)
from .spec import canonical_dtype

# how hidden states cross stages: runtime/transport.py
TRANSPORTS = ("auto", "object_store", "p2p", "compiled")
BALANCES = ("params", "flops")
BACKENDS = ("ray", "local")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
QUANTIZATIONS = ("int8",)  # weight-only; None: none


def _positive(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(section, name)}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    path: str  # checkpoint directory or hub id
    dtype: str = "float32"
    quantization: str | None = None  # "int8": weight-only, Mamba excluded
    max_model_len: int | None = None  # None: min(the model's max positions, 4096)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization must be null or one of {QUANTIZATIONS}, got {self.quantization!r}"
            )


@dataclass(frozen=True, slots=True)
class StateConfig:
    state_memory_gib: float = 4.0  # per stage: Mamba slots and checkpoints, then KV blocks
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True  # vLLM's name: reuse KV blocks and Mamba checkpoints
    checkpoint_every: int = 256  # tokens between Mamba checkpoints inside a long prompt
    # None: one per state slot (two with recovery snapshots), and up to 4 more per slot from
    # budget no KV block could use (config/capacity.py)
    num_checkpoints: int | None = None
    num_kv_blocks: int | None = None  # None: what the budget holds (vLLM's num_gpu_blocks_override)
    # GPU stages: this fraction of the device, less weights and a measured activation peak, is the
    # budget instead of state_memory_gib (vLLM's name; None: the stated budget)
    gpu_memory_utilization: float | None = None
    # The cluster prefix tier (Ray backend): checkpoints and their KV blocks published to a
    # detached actor that outlives replicas, imported on a local miss. Off by default: it keeps
    # up to prefix_tier_bytes of host memory in the cluster after this engine is gone.
    prefix_tier: bool = False
    prefix_tier_bytes: int = 2 * 2**30
    prefix_tier_min_tokens: int = 64  # least tokens an import must save (docs: cost model)

    def __post_init__(self) -> None:
        if self.state_memory_gib <= 0:
            raise ConfigError(f"state_memory_gib must be positive, got {self.state_memory_gib}")
        _positive(self, "block_size", "checkpoint_every")
        _positive(self, "prefix_tier_bytes", "prefix_tier_min_tokens")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # state slots per stage (clamped to the state budget)
    # tokens per micro-batch; long prompts are chunked to fit. None: by the stages' device
    # (`BATCHED_TOKENS`): a prefill chunk's matmuls want thousands of rows to reach full speed
    max_batched_tokens: int | None = None
    max_waiting: int = 256  # queued requests before new ones are refused (429)

    def __post_init__(self) -> None:
        _positive(self, "max_num_seqs", "max_waiting")
        if self.max_batched_tokens is not None:
            _positive(self, "max_batched_tokens")

    def on(self, device: str) -> SchedulerConfig:
        """With `max_batched_tokens` decided for stages on `device` ("cpu" or "cuda")."""
        if self.max_batched_tokens is not None:
            return self
        return replace(self, max_batched_tokens=BATCHED_TOKENS[device])


# max_batched_tokens by device when not given: vLLM's chunked-prefill size on GPUs; on CPUs the
# size past which an 8K prefill on 2 cores gains nothing (benchmarks/prefill.py)
BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    num_stages: int = 1
    stage_slices: tuple[tuple[int, int], ...] | None = None  # explicit [start, end) slices
    balance: str = "params"
    num_cpus_per_stage: float | None = (
        None  # None: an equal share of the CPUs Ray has free, at most 1
    )
    num_gpus_per_stage: float = 0.0
    strategy: str = "PACK"
    resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources per stage
    accelerator_type: str | None = None  # e.g. "A100-80G": Ray's accelerator_type:<X> resource
    device_memory_gib: float | None = None  # set: refuse layouts that do not fit the device
    activation_memory_gib: float = 0.5  # per stage, headroom for activations in the fit check
    in_current_group: bool = False  # stages join the caller's placement group (Serve replicas)
    ready_timeout_s: float = 600.0  # stage start-up (a 24 GiB slice loads for minutes)
    backend: str = "ray"  # "ray": a Ray actor per stage; "local": all stages in this process

    def __post_init__(self) -> None:
        if self.stage_slices is not None:
            object.__setattr__(self, "num_stages", len(self.stage_slices))
        custom = dict(self.resources)
        if self.accelerator_type:  # as Ray's own accelerator_type option asks for it
            custom[f"accelerator_type:{self.accelerator_type}"] = 0.001
        object.__setattr__(self, "resources", tuple(sorted(custom.items())))
        _positive(self, "num_stages")
        if self.balance not in BALANCES:
            raise ConfigError(f"balance must be one of {BALANCES}, got {self.balance!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"placement strategy must be one of {STRATEGIES}, got {self.strategy!r}"
            )


@dataclass(frozen=True, slots=True)
class ComputeConfig:
    # torch threads of a stage that runs alone; k micro-batches in flight share them. None: the
    # CPUs the pipeline holds on one node (`runtime/stage_spec.default_threads`)
    threads_per_stage: int | None = None
    transport: str = "auto"  # hidden states between stages: auto | object_store | p2p | compiled
    decode_graphs: bool = False  # decode at fixed shapes, CUDA graphs on GPUs

    def __post_init__(self) -> None:
        if self.threads_per_stage is not None:
            _positive(self, "threads_per_stage")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    max_stage_restarts: int = 3  # replacements per failure before requests fail (503)
    # Stages export each Mamba checkpoint and full KV block (to the driver-owned object store) as
    # it is made; a replacement stage imports them, and sequences replay only since their last
    # checkpoint. Off (or without prefix caching): every running sequence replays in full.
    recovery_snapshots: bool = True


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to build and run one pipeline."""

    model: ModelConfig
    state: StateConfig = field(default_factory=StateConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def __post_init__(self) -> None:
        if self.compute.decode_graphs and self.model.quantization:
            raise ConfigError(
                "decode_graphs needs unquantized weights: int8 experts route with a host sync"
            )
        if self.placement.num_gpus_per_stage == 0 and self.model.dtype == "float16":
            raise ConfigError("float16 needs a GPU stage; use float32 or bfloat16 on CPU")
        if self.state.prefix_tier and self.compute.transport == "compiled":
            # a tier import is its own call to each stage, ordered after the steps in flight
            # only on per-task transports (a compiled graph runs beside other calls)
            raise ConfigError(
                "prefix_tier needs a per-task transport (auto, object_store or p2p), not compiled"
            )

    @property
    def device(self) -> str:
        """Where the stages run: "cuda" with GPUs reserved per stage, else "cpu"."""
        return "cuda" if self.placement.num_gpus_per_stage else "cpu"

    @property
    def batched_tokens(self) -> int:
        """`max_batched_tokens`, or its default on this config's device."""
        return self.scheduler.on(self.device).max_batched_tokens

    @classmethod
    def build(cls, model: str, **flat: Any) -> EngineConfig:
        """From vLLM-style flat options (`num_stages=2, max_num_seqs=16, dtype="bf16"`); each name
        belongs to one section, and an unknown name is refused by name."""
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in flat.items():
            sections[section_of(key)][key] = value
        sections["model"]["path"] = str(model)
        return cls(**{name: _SECTIONS[name](**kw) for name, kw in sections.items()})

    def with_options(self, **flat: Any) -> EngineConfig:
        """A copy with some flat options changed."""
        changed = {}
        for key, value in flat.items():
            owner = section_of(key)
            changed[owner] = replace(changed.get(owner, getattr(self, owner)), **{key: value})
        return replace(self, **changed)


_SECTIONS = {
    "model": ModelConfig,
    "state": StateConfig,
    "scheduler": SchedulerConfig,
    "placement": PlacementConfig,
    "compute": ComputeConfig,
    "recovery": RecoveryConfig,
}
# each flat option name -> the section that owns it (EngineConfig.build, overrides, the CLI)
OPTION_SECTION = {
    f.name: name for name, cls in _SECTIONS.items() for f in fields(cls) if f.name != "path"
}


def section_of(option: str) -> str:
    """The `EngineConfig` section a flat option name belongs to ("num_stages" -> "placement")."""
    owner = OPTION_SECTION.get(option)
    if owner is None:
        raise ConfigError(f"unknown engine option {option!r}; known: {sorted(OPTION_SECTION)}")
    return owner


def default_of(cls: type, name: str) -> Any:
    """The one default of a field, for mirrors of this tree (the YAML models, the CLI)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


def option_default(option: str) -> Any:
    """The default of a flat engine option (`option_default("max_num_seqs")` -> 64)."""
    return default_of(_SECTIONS[section_of(option)], option)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """A whole served pipeline: the engine and its Serve front (`pipelines/*.yaml`)."""

    name: str
    engine: EngineConfig
    serve: ServeConfig = field(default_factory=ServeConfig)
    model_given: bool = True  # False: the layout names no model, the tiny default is served
