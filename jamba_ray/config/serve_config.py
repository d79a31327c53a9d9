"""The Serve part of the config tree: how engine replicas (pipelines) are routed to and scaled,
and the ingress in front of them. Pure Python; `engine_config` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError

ROUTERS = ("prefix", "default")  # engine replicas: by the prefix they hold / Serve's power of two
# what autoscaling keeps per engine replica at its target: Serve's ongoing requests, or what fills
# a pipeline (slots in use, KV blocks in use, prompt tokens waiting for prefill): serve/autoscale
AUTOSCALING_TARGETS = ("ongoing_requests", "slots", "blocks", "prefill_tokens")


@dataclass(frozen=True, slots=True)
class AutoscalingConfig:
    """Serve's own autoscaling options (the ingress's, and the base of the engines')."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # per replica (= per pipeline)
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    look_back_period_s: float | None = None

    def serve_dict(self) -> dict[str, Any]:
        """Serve's own autoscaling options (an engine target's policy: serve/autoscale.py)."""
        if self.max_replicas < self.min_replicas:
            raise ConfigError("autoscaling.max_replicas must be at least min_replicas")
        return {
            f.name: getattr(self, f.name)
            for f in fields(AutoscalingConfig)
            if getattr(self, f.name) is not None
        }


@dataclass(frozen=True, slots=True)
class EngineAutoscalingConfig(AutoscalingConfig):
    """Engine replicas also scale on what fills a pipeline."""

    target: str = "ongoing_requests"  # one of AUTOSCALING_TARGETS
    # per replica, for a target other than ongoing_requests; None: 3/4 of a replica's slots or
    # KV blocks, or one step's tokens (max_batched_tokens) of waiting prefill
    target_value: float | None = None

    def __post_init__(self) -> None:
        if self.target not in AUTOSCALING_TARGETS:
            raise ConfigError(
                f"serve.autoscaling.target must be one of {AUTOSCALING_TARGETS}, "
                f"got {self.target!r}"
            )
        if self.target_value is not None and self.target_value <= 0:
            raise ConfigError(
                f"serve.autoscaling.target_value must be positive, got {self.target_value}"
            )


@dataclass(frozen=True, slots=True)
class RouterConfig:
    # one of ROUTERS: "prefix" (serve/router.py) or "default" (Serve's power of two choices)
    policy: str = "prefix"
    # a prefix holder is passed over when it has more than this many ongoing requests beyond the
    # least loaded replica (Ray's PrefixCacheAffinityRouter's imbalanced_threshold)
    imbalance_threshold: float = 8.0
    stats_period_s: float = 1.0  # how often each replica reports what it holds
    recent_ttl_s: float = 5.0  # how long a routed request counts as held before reports say so

    def __post_init__(self) -> None:
        if self.policy not in ROUTERS:
            raise ConfigError(f"serve.router.policy must be one of {ROUTERS}, got {self.policy!r}")
        for name, low in (("imbalance_threshold", 0), ("recent_ttl_s", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"serve.router.{name} must be >= 0, got {getattr(self, name)}")
        if self.stats_period_s <= 0:
            raise ConfigError(f"serve.router.stats_period_s must be > 0, got {self.stats_period_s}")


@dataclass(frozen=True, slots=True)
class IngressConfig:
    """The front deployment (HTTP, gRPC, tokenization): no GPU, scaled apart from the engines."""

    num_cpus: float = 0.25  # per ingress replica
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None  # None: no gRPC proxy
    served_model_name: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None  # largest max_tokens a request may ask
    request_timeout_s: float = 600.0
    api_key_env: str | None = None  # env var holding the API key (unset field: no auth)
    replica_cpus: float = 0.5  # CPUs of each engine replica itself (its step loop), beside stages
    # scale-down / redeploy: a replica stops taking requests and its streams get this long to end
    graceful_shutdown_timeout_s: float = 600.0
    health_check_period_s: float = 10.0
    autoscaling: EngineAutoscalingConfig = field(default_factory=EngineAutoscalingConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
