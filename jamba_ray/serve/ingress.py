"""The Serve application: one replica = one whole pipeline, behind a FastAPI ingress.

(No `from __future__ import annotations` here: FastAPI reads the route annotations at runtime.
Helpers the routes call are defined above the class: Serve pickles the ingress class by value.)
"""

import asyncio
import logging
import os
import time
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config.engine_config import PipelineConfig
from ..config.pipeline_file import PipelineFile
from ..engine.client import EngineClient
from ..errors import (
    AuthenticationError,
    ConfigError,
    ModelNotFoundError,
    RequestTimeoutError,
    RequestTooLargeError,
    RouteNotFoundError,
    StageFailedError,
)
from .errors import error_body, retry_headers
from .grpc import GrpcMethods
from .http import error_response, guard, invalid
from .openai import OpenAIServing
from .protocol import ChatCompletionRequest, CompletionRequest
from .tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize, tokenizer_info
from .translate import Limits

log = logging.getLogger("jamba_ray.serve")
api = FastAPI(title="jamba-ray", description="OpenAI-compatible API over a Jamba stage pipeline")


@api.exception_handler(StarletteHTTPException)
async def _unknown_route(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in OpenAI's error shape too."""
    what = "method not allowed" if exc.status_code == 405 else "no such route"
    error = RouteNotFoundError(f"{what}: {request.method} {request.url.path}")
    return JSONResponse(error_body(exc.status_code, "not_found_error", str(error)), exc.status_code)


def api_key(env: str | None) -> str | None:
    """The key named by `serve.api_key_env`; a named but unset variable refuses to start (an
    unauthenticated server must never come up by accident)."""
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise ConfigError(
            f"serve.api_key_env names {env}, but that environment variable is not set"
        )
    return key


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=10, health_check_timeout_s=60)
@serve.ingress(api)
class JambaServer(GrpcMethods):
    """Owns one AsyncEngine, whose stage actors live in this replica's placement group."""

    def __init__(self, config: PipelineConfig, model_name: str):
        from ..engine.async_engine import AsyncEngine

        opts = config.serve
        self.api_key = api_key(opts.api_key_env)
        engine_cfg = config.engine.with_options(in_current_group=True)
        self.engine: EngineClient = AsyncEngine(engine_cfg)
        self.model_name = model_name
        self.max_body = opts.max_body_bytes
        self.timeout_s = opts.request_timeout_s
        self.serving = OpenAIServing(
            self.engine, model_name, Limits(opts.max_prompt_tokens, opts.max_tokens_limit)
        )

    # ---- plumbing ---------------------------------------------------------------------------
    async def _body(self, request: Request, model_cls):
        self._auth(request.headers.get("authorization"))
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise RequestTooLargeError(f"request body exceeds {self.max_body} bytes")
        raw = await request.body()
        if len(raw) > self.max_body:
            raise RequestTooLargeError(f"request body exceeds {self.max_body} bytes")
        try:
            req = model_cls.model_validate_json(raw)
        except ValidationError as e:
            raise invalid(e) from None
        if req.model is not None:  # (optional on the tokenizer routes, as in vLLM)
            self._card(req.model)
        return req

    def _card(self, model_id: str | None = None) -> dict:
        if model_id is not None and model_id != self.model_name:
            raise ModelNotFoundError(
                f"The model '{model_id}' does not exist; this server serves '{self.model_name}'"
            )
        max_len = self.engine.model_card()["max_model_len"]
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "jamba-ray",
                "max_model_len": max_len}  # fmt: skip

    def _auth(self, header: str | None) -> None:
        if self.api_key and header != f"Bearer {self.api_key}":
            raise AuthenticationError("invalid or missing API key")

    async def _call(self, request: Request, fn, model_cls=None):
        """A small JSON route: the key (and the body, when it has one), then fn(body)."""
        try:
            if model_cls is None:
                self._auth(request.headers.get("authorization"))
                return JSONResponse(fn(None))
            return JSONResponse(fn(await self._body(request, model_cls)))
        except Exception as e:
            return error_response(e)

    async def _respond(self, request: Request, model_cls, unary, streaming):
        try:
            req = await self._body(request, model_cls)
            if req.stream:
                events = await streaming(req)
                return StreamingResponse(
                    guard(events, self.timeout_s),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            return JSONResponse(await asyncio.wait_for(unary(req), self.timeout_s))
        except TimeoutError:
            return error_response(RequestTimeoutError("request timed out"))
        except Exception as e:
            return error_response(e)

    # ---- routes -----------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond(
            request, CompletionRequest, self.serving.completion, self.serving.completion_stream
        )

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._respond(
            request, ChatCompletionRequest, self.serving.chat, self.serving.chat_stream
        )

    @api.get("/v1/models")
    async def models(self, request: Request):
        return await self._call(request, lambda _: {"object": "list", "data": [self._card()]})

    @api.get("/v1/models/{model_id:path}")
    async def model(self, request: Request, model_id: str):
        return await self._call(request, lambda _: self._card(model_id))

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        max_len = self.engine.model_card()["max_model_len"]
        run = lambda r: tokenize(self.serving, r, max_len)  # noqa: E731
        return await self._call(request, run, TokenizeRequest)

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        tok = self.serving.tok
        return await self._call(request, lambda r: detokenize(tok, r, len(tok)), DetokenizeRequest)

    @api.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request):
        return await self._call(request, lambda _: tokenizer_info(self.serving.tok))

    @api.get("/version")
    async def version(self):
        try:
            return {"version": version("jamba-ray")}
        except PackageNotFoundError:
            return {"version": "unknown"}

    @api.get("/health")
    async def health(self):
        """A real one-token forward through every stage, on the pipeline's reserved probe slot.
        While a stage is being replaced: 503 with Retry-After and status "recovering", so that
        new work goes to other replicas while the streams in flight continue."""
        if self.engine.recovering:
            body = {"status": "recovering", "stages": self.engine.model_card()["stages"]}
            return JSONResponse(body, 503, headers=retry_headers(503))
        try:
            t0 = time.perf_counter()
            await self.engine.probe()
            return {
                "status": "ok",
                "stages": self.engine.model_card()["stages"],
                "probe_s": time.perf_counter() - t0,
            }
        except Exception as e:
            return error_response(StageFailedError(f"health probe failed: {type(e).__name__}"))

    @api.get("/metrics")
    async def metrics(self):
        text = await self.engine.metrics()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        try:  # engine internals (stage pids, counters): behind the key; health and metrics are not
            self._auth(request.headers.get("authorization"))
        except AuthenticationError as e:
            return error_response(e)
        return await self.engine.stats()

    # ---- Serve hooks ------------------------------------------------------------------------
    async def check_health(self) -> None:
        """Serve's periodic check. A recovery in progress passes (failing would have Serve kill the
        replica and every stream the recovery keeps alive), and a dead stage the probe finds
        starts one; only a pipeline that is broken and not recovering fails."""
        await self.engine.check(timeout_s=30)

    def __del__(self):
        try:
            self.engine.shutdown()
        except Exception:
            pass


def served_name(config: PipelineConfig) -> str:
    if config.serve.served_model_name:
        return config.serve.served_model_name
    return "jamba-tiny" if not config.model_given else Path(config.engine.model.path).name


def deployment(config: PipelineConfig) -> serve.Application:
    """Bind the app: the replica's placement group = [replica bundle] + one bundle per stage."""
    from ..runtime.placement import stage_bundle

    if not config.model_given:
        from ..tiny import ensure_default_tiny

        ensure_default_tiny()
    api_key(config.serve.api_key_env)  # refuse here too, before any replica starts
    place = config.engine.placement
    bundle = stage_bundle(place, place.num_stages)
    engine = replace(config.engine, placement=replace(place, num_cpus_per_stage=bundle["CPU"]))
    config = replace(config, engine=engine)
    bundles = [{"CPU": config.serve.replica_cpus}] + [bundle] * place.num_stages
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if os.environ.get("JAMBA_RAY_REPLACEMENT_DELAY_S"):  # a test knob: slow replacement stages
        env["JAMBA_RAY_REPLACEMENT_DELAY_S"] = os.environ["JAMBA_RAY_REPLACEMENT_DELAY_S"]
    if config.serve.api_key_env:
        env[config.serve.api_key_env] = os.environ[config.serve.api_key_env]
    return JambaServer.options(
        name="JambaServer",
        placement_group_bundles=bundles,
        placement_group_strategy=place.strategy,
        autoscaling_config=config.serve.autoscaling.serve_dict(),
        graceful_shutdown_timeout_s=config.serve.graceful_shutdown_timeout_s,
        health_check_period_s=config.serve.health_check_period_s,
        ray_actor_options={"num_cpus": config.serve.replica_cpus, "runtime_env": {"env_vars": env}},
    ).bind(config, served_name(config))


def build_app(args: dict) -> serve.Application:
    """Serve config entry point (`import_path: jamba_ray.serve.app:build_app`)."""
    pipeline = PipelineFile.load_or_default(args.get("config"))
    return deployment(pipeline.to_config(args.get("model")))
