"""What `jamba-ray serve` checks before anything starts (ports, model, state budget) and before
Serve starts (what one replica reserves against the cluster): a start that cannot succeed fails in
seconds, saying why, instead of hanging on a placement group or failing inside a replica."""

from __future__ import annotations

import errno
import socket

from ..config.engine_config import PipelineConfig
from ..errors import ConfigError


def check_ports(host: str, ports: dict[str, int | None]) -> None:
    """Each port (keyed by the flag that sets it) is free on `host`. Serve's proxies bind with
    SO_REUSEPORT, so a second server on a busy port would start and share it; a plain bind does
    not, and fails while any server listens there."""
    for flag, port in ports.items():
        if port is None:
            continue
        try:
            family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
                s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is already in use (another server?); "
                    f"stop it or choose another port with {flag}"
                ) from None
            raise ConfigError(f"cannot listen on {host}:{port} ({flag}): {e}") from None


def check_model(config: PipelineConfig) -> None:
    """The checkpoint resolves and the layout's state budget holds it, as the engine checks in the
    replica (builds the tiny default first when no model is named)."""
    from ..config.capacity import derive_capacity
    from ..config.fit import fit_check, require_fit
    from ..config.model_path import resolve
    from ..config.planner import plan
    from ..config.spec import ModelSpec

    if not config.model_given:
        from ..tiny import ensure_default_tiny

        ensure_default_tiny()
    engine = config.engine
    spec = ModelSpec.from_path(resolve(engine.model.path).root)
    place = engine.placement
    slices = [tuple(s) for s in place.stage_slices] if place.stage_slices else None
    plans = plan(spec, place.num_stages, slices, engine.model.dtype, place.balance)
    if not (engine.state.gpu_memory_utilization and place.num_gpus_per_stage):
        derive_capacity(spec, engine, plans)
    if place.device_memory_gib:
        require_fit(fit_check(spec, engine, plans))


def replica_bundles(config: PipelineConfig) -> list[dict[str, float]]:
    """One replica's placement group: the replica's own bundle, then one per stage (a stage
    without `num_cpus_per_stage` asks Ray for its share of the free CPUs)."""
    from ..runtime.placement import stage_bundle

    place = config.engine.placement
    stage = stage_bundle(place, place.num_stages)
    return [{"CPU": config.serve.replica_cpus}] + [stage] * place.num_stages


def local_resources() -> dict[str, float]:
    """The CPUs a local Ray would start with (cgroup limits included); Ray is not started."""
    from ray._private.utils import get_num_cpus

    return {"CPU": float(get_num_cpus())}


def cluster_resources() -> dict[str, float]:
    import ray

    return ray.cluster_resources()


def check_resources(config: PipelineConfig, have: dict[str, float], complete=True) -> None:
    """`have` (a cluster's totals; `complete=False`: only those it names are known) can hold
    `min_replicas` replicas at all; otherwise their placement groups would wait forever and
    `serve` would hang without a word."""
    bundles = replica_bundles(config)
    replicas = max(1, config.serve.autoscaling.min_replicas)
    stages = len(bundles) - 1
    asked = {r for b in bundles for r, amount in b.items() if amount}
    for res in sorted(asked if complete else asked & set(have)):
        need = replicas * sum(b.get(res, 0.0) for b in bundles)
        if need > have.get(res, 0.0) + 1e-9:
            raise ConfigError(
                f"{replicas} replica(s) of {stages} stage(s) need {need:g} {res} "
                f"({bundles[-1].get(res, 0.0):g} per stage, {bundles[0].get(res, 0.0):g} for the "
                f"replica); the cluster has {have.get(res, 0.0):g}. Use fewer stages (--stages) or "
                "smaller reservations (engine.placement.num_cpus_per_stage, "
                "serve.replica_cpus in the layout)"
            )
