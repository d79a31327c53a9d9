"""Memory fit check: weights + state pool + activations per stage against its device.
Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .capacity import derive_capacity, pool_bytes
from .engine_config import EngineConfig
from .planner import StagePlan, embed_params, ffn_params, head_params, human_bytes, mixer_params
from .spec import ModelSpec, dtype_bytes

GiB = 2**30


def quantized_layer_bytes(spec: ModelSpec, layer: int, dtype: str) -> int:
    """int8 weight-only: attention and MLP/MoE linears take 1 byte (+ an fp32 scale per output row);
    Mamba, norms and the router stay in `dtype`, as the Jamba docs advise."""
    b, h = dtype_bytes(dtype), spec.hidden_size
    ffn = ffn_params(spec, layer)
    router = spec.num_experts * h if spec.is_moe(layer) else 0
    ffn_linear = ffn - router
    ffn_rows = ffn_linear // h  # output rows summed over gate/up/down (each has H or I inputs)
    q = ffn_linear + 4 * ffn_rows + router * b
    mixer = mixer_params(spec, layer)
    if spec.is_attention(layer):
        q += mixer + 4 * (mixer // h)
    else:
        q += mixer * b
    return q + 2 * h * b


def stage_weight_bytes(
    spec: ModelSpec, p: StagePlan, dtype: str, quantization: str | None, last: bool
) -> int:
    if quantization is None:
        return p.param_bytes
    b = dtype_bytes(dtype)
    total = sum(quantized_layer_bytes(spec, i, dtype) for i in p.layers)
    total += embed_params(spec) * b if p.index == 0 else 0
    total += head_params(spec) * b if last else 0
    return total


def activation_bytes(spec: ModelSpec, tokens: int, dtype: str, last: bool) -> int:
    """Peak per micro-batch: the chunk's scan states (fp32), projections, and the logits (last)."""
    b, di = dtype_bytes(dtype), spec.d_inner
    per_token = (
        di * spec.mamba_d_state * 4 * 3
        + (4 * di + 3 * spec.intermediate_size + 4 * spec.hidden_size) * b
    )
    logits = tokens * spec.vocab_size * 4 * 2 if last else 0
    return tokens * per_token + logits


@dataclass(frozen=True, slots=True)
class StageFit:
    index: int
    weights: int
    pool: int
    activations: int
    device: int | None

    @property
    def total(self) -> int:
        return self.weights + self.pool + self.activations

    @property
    def fits(self) -> bool:
        return self.device is None or self.total <= self.device


def fit_check(spec: ModelSpec, cfg: EngineConfig, plans: list[StagePlan]) -> list[StageFit]:
    """Each stage's weights + state pool + activations against `placement.device_memory_gib`."""
    cap, place, model = derive_capacity(spec, cfg, plans), cfg.placement, cfg.model
    device = int(place.device_memory_gib * GiB) if place.device_memory_gib else None
    fits = []
    for p in plans:
        last = p.index == len(plans) - 1
        pool = pool_bytes(cap, p)
        act = activation_bytes(spec, cfg.batched_tokens, model.dtype, last)
        act = max(act, int(place.activation_memory_gib * GiB))
        weights = stage_weight_bytes(spec, p, model.dtype, model.quantization, last)
        fits.append(StageFit(p.index, weights, pool, act, device))
    return fits


def format_fit(fits: list[StageFit]) -> str:
    rows = [
        f"{'stage':>5} {'weights':>11} {'state pool':>11} {'activations':>12} "
        f"{'total':>11} {'device':>11}  fits",
        "-" * 72,
    ]
    for f in fits:
        dev = human_bytes(f.device) if f.device else "-"
        rows.append(
            f"{f.index:>5} {human_bytes(f.weights):>11} {human_bytes(f.pool):>11} "
            f"{human_bytes(f.activations):>12} {human_bytes(f.total):>11} {dev:>11}  "
            f"{'yes' if f.fits else 'NO'}"
        )
    return "\n".join(rows)


def require_fit(fits: list[StageFit]) -> None:
    bad = [f for f in fits if not f.fits]
    if bad:
        worst = max(bad, key=lambda f: f.total - f.device)
        raise ConfigError(
            f"layout does not fit: stage {worst.index} needs {human_bytes(worst.total)} "
            f"(weights {human_bytes(worst.weights)}, state {human_bytes(worst.pool)}, activations "
            f"{human_bytes(worst.activations)}) but its device has {human_bytes(worst.device)}; "
            "use more stages, int8 quantization, fewer sequences (max_num_seqs) "
            "or a shorter max_model_len"
        )
