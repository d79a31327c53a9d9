"""gRPC methods of the Serve deployment (`JambaService` in jamba.proto), via Serve's gRPC proxy."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc

from ..engine.outputs import CompletionOutput, accumulate
from ..engine.sampling_params import SamplingParams, StructuredOutputs
from ..errors import (
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTimeoutError,
    StageFailedError,
)
from ..proto import jamba_pb2 as pb
from .errors import grpc_status
from .structured import build

log = logging.getLogger("jamba_ray.serve.grpc")

_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "ignore_eos",
    "n",
    "priority",
    "cache_salt",
)


def sampling_from_proto(opts: pb.SamplingOptions, tokenizer: str | None = None) -> SamplingParams:
    """`tokenizer`: the vocabulary a structured-output grammar is built for."""
    kwargs = {f: getattr(opts, f) for f in _FIELDS if opts.HasField(f)}
    if opts.HasField("structured"):
        kwargs["structured"] = structured_from_proto(opts.structured, tokenizer)
    return SamplingParams(stop=list(opts.stop), stop_token_ids=list(opts.stop_token_ids), **kwargs)


def structured_from_proto(so: pb.StructuredOutput, tokenizer: str | None) -> StructuredOutputs:
    kind = so.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError("structured needs one of its constraints set", "structured")
    value = getattr(so, kind)
    kinds = {"json_schema": "json", "choice": "choice"}
    value = list(value.values) if kind == "choice" else value
    kwargs = {kinds.get(kind, kind): value, "any_whitespace": not so.disable_any_whitespace}
    return build("structured", kwargs, tokenizer)


def prompt_from_proto(req: pb.GenerateRequest) -> str | list[int]:
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidRequestError("a prompt is required: set text or token_ids")
    return req.text if which == "text" else list(req.token_ids.ids)


def completion_proto(index: int, text: str, token_ids, finish_reason, logprobs) -> pb.Completion:
    lps = [
        pb.TokenLogprob(token_id=t, logprob=e[t], top={k: v for k, v in e.items()})
        for t, e in zip(token_ids, logprobs or [])
    ]
    return pb.Completion(
        index=index, text=text, token_ids=token_ids, finish_reason=finish_reason or "", logprobs=lps
    )


class GrpcMethods:
    """Mixed into the ingress; expects `_serving(model)`, `self.api_key`, `self.timeout_s`. A call
    picks its model with a `model` metadata entry (none: the app's first model)."""

    def _grpc_engine(self, ctx):
        meta = dict(ctx.invocation_metadata()) if ctx is not None else {}
        return self._serving(meta.get("model")).engine

    def _grpc_fail(self, ctx, exc: BaseException):
        code, message = grpc_status(exc)
        if code == "INTERNAL":
            log.exception("unexpected gRPC error", exc_info=exc)
        if ctx is not None:
            ctx.set_code(getattr(grpc.StatusCode, code))
            ctx.set_details(message)

    def _grpc_sampling(self, engine, request: pb.GenerateRequest) -> SamplingParams:
        return sampling_from_proto(request.sampling, engine.tokenizer.name_or_path)

    def _grpc_auth(self, ctx) -> None:
        if not self.api_key:
            return
        meta = dict(ctx.invocation_metadata()) if ctx is not None else {}
        if meta.get("authorization") != f"Bearer {self.api_key}":
            raise AuthenticationError("invalid or missing API key")

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> pb.GenerateResponse:
        try:
            self._grpc_auth(grpc_context)
            rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
            engine = self._grpc_engine(grpc_context)
            stream = await engine.generate(
                prompt_from_proto(request), self._grpc_sampling(engine, request), rid
            )
            acc: dict[int, CompletionOutput] = {}
            last = None
            async with _closing(stream), asyncio.timeout(self.timeout_s):
                async for out in stream:
                    last = out
                    for o in out.outputs:
                        accumulate(acc, o.index, o)
            comps = [
                completion_proto(i, c.text, c.token_ids, c.finish_reason, c.logprobs)
                for i, c in sorted(acc.items())
            ]
            return pb.GenerateResponse(
                request_id=rid,
                completions=comps,
                prompt_token_ids=last.prompt_token_ids,
                usage=_usage(last.prompt_token_ids, comps, last.num_cached_tokens),
            )
        except Exception as e:
            self._grpc_fail(grpc_context, _timed_out(e, self.timeout_s))
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context=None):
        try:
            self._grpc_auth(grpc_context)
            rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
            engine = self._grpc_engine(grpc_context)
            stream = await engine.generate(
                prompt_from_proto(request), self._grpc_sampling(engine, request), rid
            )
            total = 0
            async with _closing(stream), asyncio.timeout(self.timeout_s):
                async for out in stream:
                    deltas = [
                        completion_proto(o.index, o.text, o.token_ids, o.finish_reason, o.logprobs)
                        for o in out.outputs
                    ]
                    total += sum(len(d.token_ids) for d in deltas)
                    msg = pb.GenerateStreamResponse(
                        request_id=rid, deltas=deltas, finished=out.finished
                    )
                    if out.finished:
                        p = len(out.prompt_token_ids)
                        msg.usage.CopyFrom(
                            pb.Usage(
                                prompt_tokens=p, completion_tokens=total, total_tokens=p + total
                            )
                        )
                    yield msg
        except Exception as e:
            # A stream carries its status only with a raise: Serve keeps the code set on the
            # context.
            e = _timed_out(e, self.timeout_s)
            self._grpc_fail(grpc_context, e)
            raise _StatusSet(grpc_status(e)[1]) from None

    async def Score(self, request: pb.ScoreRequest, grpc_context=None) -> pb.ScoreResponse:
        try:
            self._grpc_auth(grpc_context)
            items = list(request.texts) + [list(t.ids) for t in request.token_ids]
            if not items:
                raise InvalidRequestError("give texts or token_ids to score")
            engine, per_token = self._grpc_engine(grpc_context), request.return_token_logprobs
            results = await asyncio.wait_for(
                asyncio.gather(*[self._score_one(engine, x, per_token) for x in items]),
                self.timeout_s,
            )
            return pb.ScoreResponse(results=results)
        except Exception as e:
            self._grpc_fail(grpc_context, _timed_out(e, self.timeout_s))
            return pb.ScoreResponse()

    async def _score_one(self, engine, item, per_token: bool) -> pb.ScoreResult:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        stream = await engine.generate(item, params)
        last = None
        async with _closing(stream):
            async for out in stream:
                last = out
        ids = last.prompt_token_ids
        lps = [e[t] for t, e in zip(ids[1:], last.prompt_logprobs[1:])]
        return pb.ScoreResult(
            token_ids=ids,
            token_logprobs=lps if per_token else [],
            logprob=sum(lps),
            num_tokens=len(ids),
        )

    async def Health(self, request: pb.HealthRequest, grpc_context=None) -> pb.HealthResponse:
        """As /health: UNAVAILABLE while stages are being replaced (status "recovering": new work
        goes elsewhere, streams in flight go on) or when a stage cannot compute."""
        try:
            engine = self._grpc_engine(grpc_context)
        except ModelNotFoundError as e:  # NOT_FOUND, not a failing stage
            self._grpc_fail(grpc_context, e)
            return pb.HealthResponse(status="unavailable")
        try:
            report = await engine.health()
        except Exception as e:
            self._grpc_fail(
                grpc_context, StageFailedError(f"health probe failed: {type(e).__name__}")
            )
            return pb.HealthResponse(status="unavailable")
        if report["status"] == "recovering":
            self._grpc_fail(
                grpc_context,
                StageFailedError("recovering: stages are being replaced; retry new work later"),
            )
        return pb.HealthResponse(status=report["status"], stages=report["stages"])


def _timed_out(e: BaseException, timeout_s: float) -> BaseException:
    """The server-side request timeout (as on HTTP) answers DEADLINE_EXCEEDED."""
    if isinstance(e, TimeoutError):
        return RequestTimeoutError(f"request exceeded its {timeout_s:.0f}s timeout")
    return e


class _StatusSet(Exception):
    """Raised after the status code and details are set on the gRPC context."""


class _closing:
    """Close (and so abort, if unfinished) a request stream however the call ends."""

    def __init__(self, stream):
        self.stream = stream

    async def __aenter__(self):
        return self.stream

    async def __aexit__(self, *exc):
        await self.stream.aclose()


def _usage(prompt_ids, comps, cached: int = 0) -> pb.Usage:
    c = sum(len(x.token_ids) for x in comps)
    return pb.Usage(
        prompt_tokens=len(prompt_ids),
        completion_tokens=c,
        total_tokens=len(prompt_ids) + c,
        cached_tokens=cached,
    )
