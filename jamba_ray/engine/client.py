"""What the Serve fronts (HTTP and gRPC) may ask of an engine: nothing of its insides."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from .outputs import RequestOutput
from .sampling_params import SamplingParams


class RequestStreamLike(Protocol):
    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def aclose(self) -> None: ...


class EngineClient(Protocol):
    @property
    def tokenizer(self): ...

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        task: str = "generate",
    ) -> RequestStreamLike:
        """Validate and queue (errors raise here), then stream delta outputs until finished."""

    def abort(self, request_id: str) -> None: ...

    async def probe(self, timeout_s: float = 60.0) -> None:
        """A real forward through every stage; raises StageFailedError when one cannot compute."""

    async def health(self, timeout_s: float = 60.0) -> dict:
        """{"status": "recovering" | "ok", "stages", "probe_s"}; raises when a stage cannot
        compute."""

    async def check(self, timeout_s: float = 30.0) -> None:
        """Health for Serve: passes while recovering; raises when broken and not recovering."""

    async def stats(self) -> dict:
        """Engine numbers plus per-stage counters under "stages"."""

    async def metrics(self, labels: str = "") -> str:
        """Prometheus text exposition (`labels` on every sample)."""

    def model_card(self) -> dict:
        """max_model_len, stages, max_num_seqs, vocab_size."""

    def shutdown(self) -> None: ...
