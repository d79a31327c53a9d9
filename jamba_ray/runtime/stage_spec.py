"""What a stage is built from: its slice, sizes and device (`StageSpec`), and the probe message
that touches none of the engine's state."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..engine.messages import Segment, StepMessage


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What a stage needs to build itself."""

    model: str
    index: int
    start: int
    end: int
    num_stages: int
    slots: int  # Mamba state slots, the probe slot included (the last one)
    max_len: int
    blocks: int = 0  # KV blocks, the probe's scratch block included (the last one)
    block_size: int = 16
    checkpoints: int = 0  # Mamba checkpoints for prefix reuse
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1
    quantization: str | None = None  # "int8": weight-only, Mamba excluded
    decode_graphs: bool = False  # fixed-shape decode steps, CUDA graphs on GPUs
    eos_id: int | None = None

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1


def default_threads(cpus_per_stage: float, num_stages: int, strategy: str) -> int:
    """Torch threads of a stage that runs alone: the CPUs its pipeline holds on its node (all
    stages' when they are packed onto one, else its own). Stages take turns on a long prompt,
    so each uses them all; with k micro-batches in flight each uses 1/k (`Stage.forward`)."""
    packed = strategy in ("PACK", "STRICT_PACK")
    return max(1, math.ceil(cpus_per_stage * (num_stages if packed else 1) - 1e-9))


def stage_specs(
    config, model: str, plans, eos_id: int | None, default_threads: int = 1
) -> list[StageSpec]:
    """One spec per stage plan, its state not sized yet (`sized`); threads are the config's, else
    `default_threads`."""
    m, c = config.model, config.compute
    return [
        StageSpec(
            model,
            p.index,
            p.start,
            p.end,
            len(plans),
            0,
            0,
            dtype=m.dtype,
            device=config.device,
            threads=c.threads_per_stage or default_threads,
            quantization=m.quantization,
            decode_graphs=c.decode_graphs,
            eos_id=eos_id,
        )
        for p in plans
    ]


def sized(spec: StageSpec, capacity) -> StageSpec:
    """`spec` with its state pool's sizes: the engine's slots and blocks plus the probe's own."""
    return replace(
        spec,
        slots=capacity.max_num_seqs + 1,
        max_len=capacity.max_model_len,
        blocks=capacity.num_blocks + 1,
        block_size=capacity.block_size,
        checkpoints=capacity.num_checkpoints,
    )


def probe_message(spec: StageSpec) -> StepMessage:
    """One token on the probe's own slot and block (the last of each): it touches no sequence."""
    probe = Segment(-1, spec.slots - 1, 0, 1, "none", blocks=(spec.blocks - 1,))
    return StepMessage(-1, (probe,), finished=(-1,))
