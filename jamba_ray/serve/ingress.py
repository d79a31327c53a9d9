"""The ingress deployment: HTTP (FastAPI) and gRPC, auth, validation, tokenization and chat
templates; each served model's engine is a deployment of its own (engine_deployment.py), reached
through a DeploymentHandle and routed to by the request's `model`.

(No `from __future__ import annotations` here: FastAPI reads the route annotations at runtime.
Helpers the routes call are defined above the class: Serve pickles the ingress class by value.)
"""

import asyncio
import logging
import os
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config.engine_config import PipelineConfig
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
from .metrics_text import PROMETHEUS, all_metrics
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


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(api)
class JambaServer(GrpcMethods):
    """The front of the app; `engines`: served model name -> (model path, its engine's handle)."""

    async def __init__(self, config: PipelineConfig, engines: dict):
        from .engine_handle import EngineHandle

        opts = config.serve
        self.api_key = api_key(opts.api_key_env)
        self.max_body = opts.max_body_bytes
        self.timeout_s = opts.request_timeout_s
        limits = Limits(opts.max_prompt_tokens, opts.max_tokens_limit)
        names = list(engines)
        clients = await asyncio.gather(*(EngineHandle.connect(h, p) for p, h in engines.values()))
        self.models = {n: OpenAIServing(c, n, limits) for n, c in zip(names, clients)}
        self.serving = self.models[names[0]]  # the default: routes and calls that name no model

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
        self._serving(req.model)  # (optional on the tokenizer routes, as in vLLM)
        return req

    def _serving(self, model_id: str | None) -> OpenAIServing:
        """The model a request names (None: the default one); an unknown name is a 404."""
        if model_id is None:
            return self.serving
        serving = self.models.get(model_id)
        if serving is None:
            served = ", ".join(f"'{n}'" for n in self.models)
            raise ModelNotFoundError(
                f"The model '{model_id}' does not exist; this server serves {served}"
            )
        return serving

    def _card(self, model_id: str | None = None) -> dict:
        serving = self._serving(model_id)
        max_len = serving.engine.model_card()["max_model_len"]
        return {"id": serving.model_name, "object": "model", "created": 0, "owned_by": "jamba-ray",
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

    async def _respond(self, request: Request, model_cls, kind: str):
        """`kind`: the OpenAIServing method pair (`chat`, `chat_stream`) of the request's model."""
        try:
            req = await self._body(request, model_cls)
            serving = self._serving(req.model)
            if req.stream:
                events = await getattr(serving, f"{kind}_stream")(req)
                return StreamingResponse(
                    guard(events, self.timeout_s),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            unary = getattr(serving, kind)(req)
            return JSONResponse(await asyncio.wait_for(unary, self.timeout_s))
        except TimeoutError:
            return error_response(RequestTimeoutError("request timed out"))
        except Exception as e:
            return error_response(e)

    # ---- routes -----------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond(request, CompletionRequest, "completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._respond(request, ChatCompletionRequest, "chat")

    @api.get("/v1/models")
    async def models_list(self, request: Request):
        cards = lambda _: {"object": "list", "data": [self._card(n) for n in self.models]}  # noqa: E731
        return await self._call(request, cards)

    @api.get("/v1/models/{model_id:path}")
    async def model(self, request: Request, model_id: str):
        return await self._call(request, lambda _: self._card(model_id))

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        def run(r: TokenizeRequest) -> dict:
            serving = self._serving(r.model)
            return tokenize(serving, r, serving.engine.model_card()["max_model_len"])

        return await self._call(request, run, TokenizeRequest)

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        def run(r: DetokenizeRequest) -> dict:
            tok = self._serving(r.model).tok
            return detokenize(tok, r, len(tok))

        return await self._call(request, run, DetokenizeRequest)

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
        """A real one-token forward through every stage of each model's engine (on its reserved
        probe slot). While a stage is being replaced: 503 with Retry-After and status
        "recovering", so that new work goes to other replicas while the streams in flight go on."""
        try:
            reports = await asyncio.gather(*(s.engine.health() for s in self.models.values()))
        except Exception as e:
            return error_response(StageFailedError(f"health probe failed: {type(e).__name__}"))
        body = dict(reports[0])
        if len(reports) > 1:
            body["models"] = dict(zip(self.models, reports))
        if any(r["status"] == "recovering" for r in reports):
            body["status"] = "recovering"
            body.pop("probe_s", None)
            return JSONResponse(body, 503, headers=retry_headers(503))
        return body

    @api.get("/metrics")
    async def metrics(self):
        return PlainTextResponse(await all_metrics(self.models), media_type=PROMETHEUS)

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        try:  # engine internals (stage pids, counters): behind the key; health and metrics are not
            self._auth(request.headers.get("authorization"))
        except AuthenticationError as e:
            return error_response(e)
        reports = await asyncio.gather(*(s.engine.stats() for s in self.models.values()))
        if len(reports) == 1:
            return reports[0]
        return {**reports[0], "models": dict(zip(self.models, reports))}
