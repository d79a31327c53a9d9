"""`EngineHandle`: the `EngineClient` the ingress holds, over a DeploymentHandle to one model's
engine deployment (engine_deployment.py). The fronts (openai.py, grpc.py) cannot tell it from a
local AsyncEngine: prompts are tokenized here, and the engine's errors come back as themselves.
"""

from __future__ import annotations

import asyncio
import uuid

from ..config.model_path import resolve
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from ..engine.tokenizer import encode_prompt, load_tokenizer
from ..errors import CapacityError, StageFailedError
from .engine_deployment import QUEUED
from .metrics_text import merge_families


def unwrap(e: BaseException) -> BaseException:
    """The engine's own exception out of Ray's wrapping (its class picks the HTTP / gRPC status);
    a replica that is gone or busy becomes the retryable error it amounts to."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )

    if isinstance(e, RayTaskError):
        cause = e.cause
        return cause if isinstance(cause, BaseException) else e
    if isinstance(e, BackPressureError):
        return CapacityError("the engine is at its request limit; retry later")
    gone = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)
    if isinstance(e, (*gone, ReplicaUnavailableError)):
        return StageFailedError(f"the engine replica is unavailable: {type(e).__name__}")
    return e


class RemoteStream:
    """One request's delta outputs from the engine replica; `aclose()` before the end cancels the
    call there, which aborts the request (its slot and blocks are freed)."""

    def __init__(self, gen, request_id: str, owner: EngineHandle):
        self.gen, self.request_id, self.owner = gen, request_id, owner
        self.done = False

    async def queued(self) -> None:
        """Wait for the engine to take the request; its refusal (400, 429...) raises here."""
        try:
            first = await self.gen.__anext__()
        except BaseException as e:
            await self.aclose()
            raise unwrap(e) from None
        assert first == QUEUED, first

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        try:
            out = await self.gen.__anext__()
        except StopAsyncIteration:
            self._end()
            raise
        except asyncio.CancelledError:  # the consumer is gone
            await self.aclose()
            raise
        except Exception as e:
            self._end()
            raise unwrap(e) from None
        if out.finished:
            self._end()
        return out

    def _end(self) -> None:
        self.done = True
        self.owner.streams.pop(self.request_id, None)

    async def aclose(self) -> None:
        if not self.done:
            self._end()
            self.gen.cancel()

    def __del__(self) -> None:
        if not self.done:
            try:
                self.gen.cancel()
            except Exception:
                pass


class EngineHandle:
    """EngineClient over a DeploymentHandle; `connect()` builds one (model card, tokenizer)."""

    def __init__(self, handle, tokenizer, card: dict):
        self.handle, self.tok, self.card = handle, tokenizer, card
        self.streams: dict[str, RemoteStream] = {}  # open requests, for abort(request_id)

    @classmethod
    async def connect(cls, handle, model_path: str) -> EngineHandle:
        """Waits for an engine replica to answer (the app's deployments start together)."""
        card = await cls._call(handle.model_card)
        # On the loop, not in a thread: nothing is served yet, and two threads importing
        # transformers' lazy modules at once (two models) fail in the import
        tok = load_tokenizer(resolve(model_path).root)
        return cls(handle, tok, card)

    @staticmethod
    async def _call(method, *args):
        try:
            return await method.remote(*args)
        except Exception as e:
            raise unwrap(e) from None

    @property
    def tokenizer(self):
        return self.tok

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        task: str = "generate",
    ) -> RemoteStream:
        """Tokenize here, queue there (its refusals raise here), then stream its deltas."""
        ids = encode_prompt(self.tok, prompt, self.card["vocab_size"])
        rid = request_id or f"req-{uuid.uuid4().hex}"
        call = self.handle.options(stream=True).generate
        stream = RemoteStream(call.remote(ids, params, rid, task, params.cache_salt), rid, self)
        self.streams[rid] = stream
        await stream.queued()
        return stream

    def abort(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.done = True
            self.streams.pop(request_id, None)
            stream.gen.cancel()

    async def probe(self, timeout_s: float = 60.0) -> None:
        if (await self.health(timeout_s))["status"] != "ok":
            raise StageFailedError("the pipeline is recovering from a stage failure")

    async def health(self, timeout_s: float = 60.0) -> dict:
        return await self._call(self.handle.health, timeout_s)

    async def check(self, timeout_s: float = 30.0) -> None:
        """The engine replicas' health is Serve's to check (their own check_health)."""

    async def stats(self) -> dict:
        """The first replica's report (by replica id) at the top, as one replica's always was,
        and every replica's in `replicas`: an autoscaled deployment shows each pipeline."""
        reports = sorted(
            await self._everyone("stats", type_=dict), key=lambda r: r["engine"]["replica"]
        )
        return {**reports[0], "replicas": reports}

    async def metrics(self, labels: str = "") -> str:
        """Every running replica's text, merged: each sample carries its `replica` label, so a
        scrape sees every pipeline of an autoscaled deployment, not whichever one it reached."""
        return merge_families(await self._everyone("metrics", labels, type_=str))

    async def _everyone(self, method: str, *args, type_: type) -> list:
        """`method` on every running engine replica; one that fails to answer (dying, replaced)
        is left out, and none answering raises the first failure."""
        try:
            call = self.handle.broadcast(method, *args)
            got = await call.results_async(timeout_s=30, return_exceptions=True)
        except Exception as e:
            raise unwrap(e) from None
        answered = [x for x in got if isinstance(x, type_)]
        if not answered:
            raise unwrap(got[0]) if got else StageFailedError("no engine replica is running")
        return answered

    def model_card(self) -> dict:
        return self.card

    def shutdown(self) -> None:
        pass
