"""The same stages run one after another in this process (`backend: local`): no Ray, no actors.

For engine tests (real stages, milliseconds) and debugging. A stage exception comes back as a
`StepFailure`, like a failed actor task; stages never die here, so recovery only isolates.
"""

from __future__ import annotations

import os

import numpy as np

from ..config.capacity import Capacity
from ..config.engine_config import EngineConfig
from ..config.planner import StagePlan
from ..engine.messages import StepFailure, StepMessage, StepResult
from .stage import Stage
from .stage_spec import probe_message, sized, stage_specs


class LocalPipeline:
    def __init__(
        self, config: EngineConfig, model: str, plans: list[StagePlan], eos_id: int | None
    ):
        # in this process the stages run one after another: each may use every core
        self.specs = stage_specs(config, model, plans, eos_id, os.cpu_count() or 1)
        self.stages = [Stage(spec) for spec in self.specs]
        self.num_stages = len(self.stages)
        self.snapshots = False  # stages never die here

    def submit(self, msg: StepMessage, token_ids: list[int]) -> StepResult | StepFailure:
        x = np.asarray(token_ids, dtype=np.int64)
        try:
            for stage in self.stages:
                x = stage.forward(msg, x)
        except Exception as e:
            return StepFailure(f"{type(e).__name__}: {e}")
        return x

    def wait(self, handle: StepResult | StepFailure) -> StepResult | StepFailure:
        return handle

    async def wait_async(self, handle: StepResult | StepFailure) -> StepResult | StepFailure:
        return handle

    def probe(self, token_id: int) -> StepResult | StepFailure:
        return self.submit(probe_message(self.specs[0]), [token_id])

    def measure(self, utilization: float, tokens: int) -> int:
        return min(s.measure(utilization, tokens) for s in self.stages)

    def allocate(self, capacity: Capacity) -> None:
        self.specs = [sized(spec, capacity) for spec in self.specs]
        for stage, spec in zip(self.stages, self.specs):
            stage.allocate(spec)

    def dead_stages(self) -> list[int]:
        return []

    def replace(self, indices: list[int], trusted=None) -> bool:
        raise NotImplementedError("in-process stages do not die")

    def reconnect(self) -> None:
        pass

    def stats(self) -> list[dict]:
        return [s.stats() for s in self.stages]

    def shutdown(self) -> None:
        self.stages = []
