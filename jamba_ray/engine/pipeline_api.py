"""The small protocol through which the engine drives a pipeline of stages.

`runtime.pipeline.RayPipeline` runs each stage in a Ray actor; `runtime.local.LocalPipeline` runs
the same stages in this process (engine tests, no Ray). The engine imports neither: the runtime
registers them here by name (`runtime/backends.py`, imported with the package), and the engine
builds the one its config names (`placement.backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..errors import ConfigError
from .messages import StepFailure, StepMessage, StepResult


class Pipeline(Protocol):
    num_stages: int
    snapshots: bool  # it keeps the stages' exports and hands them to replacements

    def submit(self, msg: StepMessage, token_ids: list[int]) -> object:
        """Queue one micro-batch through every stage; returns a handle on its result."""

    def wait(self, handle: object) -> StepResult | StepFailure:
        """Block until the micro-batch lands (or fails)."""

    async def wait_async(self, handle: object) -> StepResult | StepFailure:
        """The same, for an asyncio driver."""

    def measure(self, utilization: float, tokens: int) -> int:
        """GPU stages: the bytes each can give to state (the least of them)."""

    def allocate(self, capacity) -> None:
        """Size every stage's state pool to `capacity` (a config.capacity.Capacity)."""

    def dead_stages(self) -> list[int]:
        """Stages that no longer answer."""

    def replace(self, indices: list[int], trusted: tuple[set[int], set[int]] | None = None) -> bool:
        """Start fresh stages in place of dead ones (blocking: they load their slice). With
        `trusted` (checkpoint and block ids), each imports its predecessor's exports of those;
        True when every one was there."""

    def reconnect(self) -> None:
        """Re-form the stages' p2p link after a failure (no-op without one)."""

    def probe(self, token_id: int) -> object:
        """A one-token forward through every stage on the probe slot; a handle like submit's."""

    def stats(self) -> list[dict]:
        """Per-stage counters (blocking; an asyncio driver calls it in a thread)."""

    def shutdown(self) -> None:
        """Stop every stage."""


# (config, model, plans, eos_id) -> a started pipeline
_BACKENDS: dict[str, Callable[..., Pipeline]] = {}


def register_backend(name: str, factory: Callable[..., Pipeline]) -> None:
    _BACKENDS[name] = factory


def backend(name: str) -> Callable[..., Pipeline]:
    """The factory registered as `name`."""
    if name not in _BACKENDS:
        raise ConfigError(f"no pipeline backend {name!r} (registered: {sorted(_BACKENDS)})")
    return _BACKENDS[name]
