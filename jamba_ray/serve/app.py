"""The Serve application: one replica = one whole pipeline, behind a FastAPI ingress."""


import asyncio
import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from ..async_engine import AsyncEngine
from ..config import EngineConfig
from ..errors import InvalidRequestError, ModelNotFoundError, StageFailedError
from ..pipeline_config import PipelineFile
from .errors import HTTPError, classify, error_body, retry_headers
from .grpc import GrpcMethods
from .openai import Limits, OpenAIServing
from .protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("jamba_ray.serve")
api = FastAPI(title="jamba-ray", description="OpenAI-compatible API over a Jamba stage pipeline")


def error_response(exc: BaseException) -> JSONResponse:
    status, err_type, _, message = classify(exc)
    if status == 500:
        log.exception("unexpected error", exc_info=exc)
    return JSONResponse(error_body(status, err_type, message), status, headers=retry_headers(status))


async def _guard(events, timeout_s: float):
    """An error (or the request timeout) after the stream started becomes an SSE error event."""
    import json

    deadline = time.monotonic() + timeout_s
    try:
        async for e in events:
            yield e
            if time.monotonic() > deadline:
                raise HTTPError(504, f"request exceeded its {timeout_s:.0f}s timeout", "timeout")
    except asyncio.CancelledError:
        raise
    except Exception as e:
        status, err_type, _, message = classify(e)
        yield f"data: {json.dumps(error_body(status, err_type, message))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=10, health_check_timeout_s=60)
@serve.ingress(api)
class JambaServer(GrpcMethods):
    """Owns one AsyncEngine, whose stage actors live in this replica's placement group."""

    def __init__(self, engine_config: EngineConfig, model_name: str, pipeline: PipelineFile):
        self.engine = AsyncEngine(engine_config)
        self.model_name = model_name
        opts = pipeline.serve
        self.max_body = opts.max_body_bytes
        self.timeout_s = opts.request_timeout_s
        self.api_key = os.environ.get(opts.api_key_env) if opts.api_key_env else None
        self.serving = OpenAIServing(self.engine, model_name, Limits(opts.max_prompt_tokens, opts.max_tokens_limit))

    # ---- plumbing ---------------------------------------------------------------------------
    async def _body(self, request: Request, model_cls):
        self._auth(request.headers.get("authorization"))
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise HTTPError(413, f"request body exceeds {self.max_body} bytes", "request_too_large")
        raw = await request.body()
        if len(raw) > self.max_body:
            raise HTTPError(413, f"request body exceeds {self.max_body} bytes", "request_too_large")
        try:
            req = model_cls.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise HTTPError(400, f"invalid field '{where}': {first['msg']}", "invalid_request_error", where) from None
        if req.model != self.model_name:
            raise ModelNotFoundError(f"The model '{req.model}' does not exist; this server serves '{self.model_name}'")
        return req

    def _auth(self, header: str | None) -> None:
        if self.api_key and header != f"Bearer {self.api_key}":
            raise HTTPError(401, "invalid or missing API key", "authentication_error")

    async def _respond(self, request: Request, model_cls, unary, streaming):
        try:
            req = await self._body(request, model_cls)
            if req.stream:
                events = await streaming(req)
                return StreamingResponse(_guard(events, self.timeout_s), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return JSONResponse(await asyncio.wait_for(unary(req), self.timeout_s))
        except asyncio.TimeoutError:
            return error_response(HTTPError(504, "request timed out", "timeout"))
        except Exception as e:
            return error_response(e)

    # ---- routes -----------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond(request, CompletionRequest, self.serving.completion,
                                   self.serving.completion_stream)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._respond(request, ChatCompletionRequest, self.serving.chat, self.serving.chat_stream)

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._auth(request.headers.get("authorization"))
        except HTTPError as e:
            return error_response(e)
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "jamba-ray",
                "max_model_len": self.engine.core.capacity.max_model_len}
        return {"object": "list", "data": [card]}

    @api.get("/health")
    async def health(self):
        """A real one-token forward through every stage, on the pipeline's reserved probe slot."""
        try:
            t0 = time.perf_counter()
            await self.engine.probe()
            return {"status": "ok", "stages": self.engine.core.pipeline.num_stages,
                    "probe_s": time.perf_counter() - t0}
        except Exception as e:
            return error_response(StageFailedError(f"health probe failed: {type(e).__name__}"))

    @api.get("/metrics")
    async def metrics(self):
        stats = await self.engine.stats()
        return PlainTextResponse(self.engine.core.metrics.render(stats), media_type="text/plain; version=0.0.4")

    @api.get("/v1/stats")
    async def stats(self):
        return await self.engine.stats()

    # ---- Serve hooks ------------------------------------------------------------------------
    async def check_health(self) -> None:
        """Serve's periodic check: every stage actor answers (cheap; /health runs a full probe)."""
        await asyncio.wait_for(asyncio.gather(*self.engine.core.pipeline.ping()), 30)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Queue depth and slot use, for custom autoscaling policies."""
        s = self.engine.core.stats_local()
        return {"queue_depth": s["requests_waiting"], "slots_in_use": s["slots_in_use"],
                "slot_utilization": s["slots_in_use"] / max(1, s["slots_total"])}

    def __del__(self):
        try:
            self.engine.shutdown()
        except Exception:
            pass


def resolve_model(pipeline: PipelineFile, model: str | None) -> str:
    model = model or pipeline.model
    if model is None:
        from ..tiny import ensure_default_tiny

        return str(ensure_default_tiny())
    return model


def served_name(pipeline: PipelineFile, model: str) -> str:
    if pipeline.serve.served_model_name:
        return pipeline.serve.served_model_name
    return "jamba-tiny" if pipeline.model is None and "tiny-default" in model else Path(model).name


def deployment(pipeline: PipelineFile, model: str | None = None) -> serve.Application:
    """Bind the app: the replica's placement group = [replica bundle] + one bundle per stage."""
    model = resolve_model(pipeline, model)
    cfg = pipeline.engine_config(model)
    from dataclasses import replace

    cfg = replace(cfg, in_current_placement_group=True)
    stage_bundle = {"CPU": cfg.num_cpus_per_stage, **dict(cfg.stage_resources)}
    if cfg.num_gpus_per_stage:
        stage_bundle["GPU"] = cfg.num_gpus_per_stage
    bundles = [{"CPU": pipeline.serve.replica_cpus}] + [stage_bundle] * cfg.num_stages
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if pipeline.serve.api_key_env and pipeline.serve.api_key_env in os.environ:
        env[pipeline.serve.api_key_env] = os.environ[pipeline.serve.api_key_env]
    return JambaServer.options(
        name="JambaServer",
        placement_group_bundles=bundles,
        placement_group_strategy=pipeline.placement,
        autoscaling_config=pipeline.autoscaling.serve_dict(),
        ray_actor_options={"num_cpus": pipeline.serve.replica_cpus, "runtime_env": {"env_vars": env}},
    ).bind(cfg, served_name(pipeline, model), pipeline)


def build_app(args: dict) -> serve.Application:
    """Serve config entry point (`import_path: jamba_ray.serve.app:build_app`)."""
    config = args.get("config")
    pipeline = PipelineFile.load(config) if config else PipelineFile(name="default")
    return deployment(pipeline, args.get("model"))


__all__ = ["JambaServer", "build_app", "deployment", "InvalidRequestError"]
