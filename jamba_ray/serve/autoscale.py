"""Autoscaling engine replicas on what fills a pipeline: slots in use, KV blocks in use, or prompt
tokens waiting for prefill, each replica kept near `target_value` of the chosen one.

Engine replicas report these numbers (`fill_metrics`, through Serve's `record_autoscaling_stats`);
Serve's controller aggregates them over its look-back window and calls `PipelineFill` with them;
Serve itself then applies min/max replicas, the up/down scaling delays and factors. The target
`ongoing_requests` is Serve's own policy (`target_ongoing_requests`), not this one.

Standard library only: Serve pickles this module by value into its controller.
"""

from __future__ import annotations

from typing import Any

# target -> (metric a replica reports, default share of its capacity to keep it at)
TARGETS = {"slots": 0.75, "blocks": 0.75, "prefill_tokens": 1.0}
POLICY_PATH = "jamba_ray.serve.autoscale:PipelineFill"


def fill_metrics(load, max_batched_tokens: int) -> dict[str, float]:
    """One replica's numbers (`load`: an `engine.prefix_report.Load`) and their capacities."""
    return {
        "slots": float(load.slots_in_use),
        "slots_capacity": float(load.slots_total),
        "blocks": float(load.kv_blocks_in_use),
        "blocks_capacity": float(load.kv_blocks_total),
        "prefill_tokens": float(load.waiting_prefill_tokens),
        "prefill_tokens_capacity": float(max_batched_tokens),  # one step's worth
    }


def desired_replicas(
    metrics: dict[str, dict[Any, float]],
    current: int,
    target: str,
    target_value: float | None,
) -> float | None:
    """Replicas that would hold the deployment's total `target` at `target_value` each (None:
    nothing reported yet). Without a `target_value`, a share of the replicas' mean capacity."""
    values = metrics.get(target) or {}
    if current == 0 or not values:
        return None
    per_replica = target_value
    if per_replica is None:
        caps = list((metrics.get(f"{target}_capacity") or {}).values())
        if not caps:
            return None
        per_replica = TARGETS[target] * sum(caps) / len(caps)
    return sum(values.values()) / max(per_replica, 1e-9)


class PipelineFill:
    """Serve's custom autoscaling policy (`policy_function` a class, built with `policy_kwargs`)."""

    def __init__(self, target: str = "slots", target_value: float | None = None):
        if target not in TARGETS:
            raise ValueError(f"autoscaling target must be one of {sorted(TARGETS)}, got {target}")
        self.target, self.target_value = target, target_value

    def __call__(self, ctx) -> tuple[float, dict]:
        want = desired_replicas(
            ctx.aggregated_metrics or {}, ctx.current_num_replicas, self.target, self.target_value
        )
        return (ctx.target_num_replicas if want is None else want), {}


def serve_autoscaling(cfg) -> dict[str, Any]:
    """Serve's `autoscaling_config` for an `AutoscalingConfig` of the tree: its own options, and
    this policy for a target other than ongoing requests."""
    out = cfg.serve_dict()
    if getattr(cfg, "target", "ongoing_requests") != "ongoing_requests":
        kwargs = {"target": cfg.target, "target_value": cfg.target_value}
        out["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": kwargs}
    return out
