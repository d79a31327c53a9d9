"""Engine metrics with a Prometheus text rendering. Pure Python (no client library needed)."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, help_text: str, labels: str = "") -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cum = 0
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts):
            cum += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cum}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        suffix = f"{{{labels}}}" if labels else ""
        lines += [f"{name}_sum{suffix} {self.total}", f"{name}_count{suffix} {self.n}"]
        return lines


@dataclass(slots=True)
class EngineMetrics:
    ttft: Histogram = field(default_factory=Histogram)
    tpot: Histogram = field(default_factory=Histogram)

    def observe(self, arrival: float, first_token_at: float | None, num_tokens: int) -> None:
        """A finished request's time to first token and time per output token after it."""
        if first_token_at is None:
            return
        self.ttft.observe(first_token_at - arrival)
        if num_tokens > 1:
            self.tpot.observe((time.monotonic() - first_token_at) / (num_tokens - 1))

    def render(self, stats: dict, labels: str = "") -> str:
        """Prometheus text exposition of the engine's gauges, counters and latency histograms."""
        sep = "," if labels else ""
        lines: list[str] = []
        for name, kind, help_text, key in ENGINE:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines.append(
                f"{name}{{{labels}}} {stats.get(key, 0)}"
                if labels
                else f"{name} {stats.get(key, 0)}"
            )
        for name, kind, help_text, key in STAGE:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for st in stats.get("stages", []):
                lines.append(f'{name}{{{labels}{sep}stage="{st["stage"]}"}} {st.get(key, 0)}')
        name = "jamba_ray_stage_kernel_fallbacks_total"
        lines += [
            f"# HELP {name} Kernels a stage disabled for the torch reference (failed self-check).",
            f"# TYPE {name} counter",
        ]
        for st in stats.get("stages", []):
            for kernel, n in st.get("kernel_fallbacks", {}).items():
                lines.append(f'{name}{{{labels}{sep}stage="{st["stage"]}",kernel="{kernel}"}} {n}')
        lines += self.ttft.render(
            "jamba_ray_time_to_first_token_seconds", "Time to first token.", labels
        )
        lines += self.tpot.render(
            "jamba_ray_time_per_output_token_seconds",
            "Time per output token after the first.",
            labels,
        )
        return "\n".join(lines) + "\n"


# (name, kind, help, key in the engine's stats). Slots and blocks are allocated by the engine with
# one numbering on every stage, so in-use counts are the same everywhere; pool sizes differ.
ENGINE = [
    ("jamba_ray_requests_running", "gauge", "Requests holding state slots.", "requests_running"),
    ("jamba_ray_requests_waiting", "gauge", "Requests queued for a free slot.", "requests_waiting"),
    ("jamba_ray_slots_in_use", "gauge", "Mamba state slots held (on every stage).", "slots_in_use"),
    ("jamba_ray_slots_total", "gauge", "Mamba state slots per stage.", "slots_total"),
    ("jamba_ray_kv_blocks_in_use", "gauge", "KV blocks held (on every stage).", "kv_blocks_in_use"),
    ("jamba_ray_kv_blocks_total", "gauge", "KV blocks per stage.", "kv_blocks_total"),
    (
        "jamba_ray_kv_blocks_cached",
        "gauge",
        "KV blocks findable by prefix hash.",
        "kv_blocks_cached",
    ),
    (
        "jamba_ray_prefix_checkpoints",
        "gauge",
        "Mamba checkpoints kept for reuse.",
        "prefix_checkpoints",
    ),
    (
        "jamba_ray_prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        "prefix_cache_queries",
    ),
    (
        "jamba_ray_prefix_cache_hits_total",
        "counter",
        "Prompt tokens resumed from the prefix cache.",
        "prefix_cache_hits",
    ),
    # the cluster prefix tier (state.prefix_tier): this engine's imports, then the tier's own
    # numbers (shared by every engine using it; as of the engine's last background refresh)
    ("jamba_ray_prefix_tier_imports_total", "counter", "Prefixes imported.", "tier_imports"),
    (
        "jamba_ray_prefix_tier_imported_tokens_total",
        "counter",
        "Prompt tokens resumed from prefixes imported from the cluster tier.",
        "tier_imported_tokens",
    ),
    (
        "jamba_ray_prefix_tier_import_failures_total",
        "counter",
        "Imports that failed (the prompt was computed instead).",
        "tier_import_failures",
    ),
    ("jamba_ray_prefix_tier_entries", "gauge", "Checkpoints in the tier.", "prefix_tier_entries"),
    ("jamba_ray_prefix_tier_bytes", "gauge", "Bytes the tier holds.", "prefix_tier_bytes"),
    ("jamba_ray_prefix_tier_hits_total", "counter", "Tier lookups hit.", "prefix_tier_hits"),
    ("jamba_ray_prefix_tier_misses_total", "counter", "Tier lookups missed.", "prefix_tier_misses"),
    (
        "jamba_ray_prefix_tier_evictions_total",
        "counter",
        "Blocks and checkpoints the tier evicted for its byte budget.",
        "prefix_tier_evictions",
    ),
    ("jamba_ray_preemptions_total", "counter", "Sequences preempted for KV blocks.", "preemptions"),
    ("jamba_ray_generated_tokens_total", "counter", "Tokens generated.", "generated_tokens"),
    ("jamba_ray_requests_finished_total", "counter", "Requests finished.", "finished_requests"),
]
STAGE = [
    ("jamba_ray_stage_state_bytes", "gauge", "Bytes of a stage's state pool.", "pool_bytes"),
    ("jamba_ray_stage_busy_seconds_total", "counter", "Time a stage spent computing.", "busy_s"),
    (
        "jamba_ray_stage_p2p_sends_total",
        "counter",
        "Hidden-state sends over the p2p transport.",
        "p2p_sent",
    ),
    (
        "jamba_ray_stage_decode_graph_steps_total",
        "counter",
        "Decode steps run at fixed shapes (CUDA graph replays on GPUs).",
        "decode_graph_steps",
    ),
]
