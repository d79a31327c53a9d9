"""What each stage reserves on the cluster, and a refusal at once when the cluster never can.

A placement group that cannot be placed waits forever (Ray keeps it pending for an autoscaler);
a layout that asks more than the cluster has is refused here, naming the shortfall, instead.
"""

from __future__ import annotations

import math

import ray

from ..config.engine_config import PlacementConfig
from ..errors import ConfigError

MIN_SHARE = 0.05  # CPUs: below this a stage would crawl


def stage_bundle(place: PlacementConfig, num_stages: int) -> dict[str, float]:
    """One stage's reservation; `num_cpus_per_stage=None` takes an equal share of the free CPUs
    (at most one each), so `LLM(num_stages=4)` runs on a 2-core machine."""
    cpus = place.num_cpus_per_stage
    if cpus is None:
        free = ray.available_resources().get("CPU", 0.0)
        cpus = min(1.0, math.floor(free / num_stages / MIN_SHARE) * MIN_SHARE)
        if cpus < MIN_SHARE:
            raise ConfigError(
                f"{num_stages} stages need at least {MIN_SHARE} CPU each; Ray has "
                f"{free:g} CPUs free. Use fewer stages or set num_cpus_per_stage"
            )
    bundle = {"CPU": float(cpus), **dict(place.resources)}
    if place.num_gpus_per_stage:
        bundle["GPU"] = place.num_gpus_per_stage
    return bundle


def require_feasible(bundle: dict[str, float], num_stages: int, strategy: str) -> None:
    """Refuse a layout the cluster's nodes cannot hold even when idle."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for res, amount in bundle.items():
        if not amount:
            continue
        per_node = [n.get(res, 0.0) for n in nodes]
        need = amount * num_stages
        if strategy == "STRICT_PACK":
            have, where = max(per_node, default=0.0), "on one node"
        elif strategy == "STRICT_SPREAD":
            have = amount * sum(1 for x in per_node if x >= amount) if num_stages else 0.0
            where = f"on {num_stages} different nodes"
        else:
            have, where = sum(math.floor(x / amount) * amount for x in per_node), "in the cluster"
        if have + 1e-9 < need:
            raise ConfigError(
                f"{num_stages} stages need {need:g} {res} ({amount:g} each) {where}; the "
                f"cluster has {have:g} usable. Use fewer stages or smaller reservations"
            )
