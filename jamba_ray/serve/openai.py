"""OpenAI-compatible completions and chat over an engine client: request -> engine -> JSON / SSE."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from ..engine.outputs import CompletionOutput, accumulate
from ..engine.sampling_params import SamplingParams
from ..errors import InvalidRequestError
from .chat import ChatServing
from .protocol import CompletionRequest, Usage
from .translate import (
    Limits,
    check_limits,
    completion_prompts,
    merge_streams,
    sampling_params,
    sse,
)


class OpenAIServing(ChatServing):
    """Turns validated OpenAI requests into engine requests and engine outputs into responses."""

    def __init__(self, engine, model_name: str, limits: Limits):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.tok = engine.tokenizer

    # ---- shared -----------------------------------------------------------------------------
    async def _start(self, prompts, params: SamplingParams, prefix: str):
        """Validate everything, then queue every prompt; on any error nothing stays queued."""
        encoded = [self.tok(p).input_ids if isinstance(p, str) and p else p for p in prompts]
        for ids in encoded:
            check_limits(self.limits, len(ids) if isinstance(ids, list) else 0, params.max_tokens)
        streams, rid = [], f"{prefix}-{uuid.uuid4().hex}"
        try:
            for i, p in enumerate(encoded):
                streams.append(await self.engine.generate(p, params, f"{rid}-{i}"))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return rid, streams

    def _token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    # ---- /v1/completions --------------------------------------------------------------------
    def completion_params(self, req: CompletionRequest) -> SamplingParams:
        if req.suffix:
            raise InvalidRequestError("suffix is not supported")
        if req.best_of not in (None, req.n):
            raise InvalidRequestError("best_of must equal n (or be omitted)")
        echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
        return sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs=echo_lp)

    async def completion(self, req: CompletionRequest) -> dict:
        params = self.completion_params(req)
        rid, streams = await self._start(completion_prompts(req), params, "cmpl")
        choices: dict[int, CompletionOutput] = {}
        prompts_out: dict[int, object] = {}
        async for i, out in merge_streams(streams):
            prompts_out[i] = out
            for o in out.outputs:
                accumulate(choices, i * req.n + o.index, o)
        usage = self._usage(prompts_out, choices)
        body = []
        for idx in sorted(choices):
            c, out = choices[idx], prompts_out[idx // req.n]
            text, lp = c.text, None
            if req.echo:
                text = self.tok.decode(out.prompt_token_ids, skip_special_tokens=True) + text
            if req.logprobs is not None:
                lp = self._completion_logprobs(c.token_ids, c.logprobs, out if req.echo else None)
            body.append(
                {"index": idx, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
            )
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": body,
            "usage": usage.model_dump(),
        }

    def _completion_logprobs(self, token_ids: list[int], logprobs, echo_out) -> dict:
        ids, lps = list(token_ids), list(logprobs or [])
        if echo_out is not None and echo_out.prompt_logprobs:
            ids = echo_out.prompt_token_ids + ids
            lps = list(echo_out.prompt_logprobs) + lps
        tokens, token_lps, tops, offsets, pos = [], [], [], [], 0
        for tid, entry in zip(ids, lps):
            text = self._token_text(tid)
            tokens.append(text)
            offsets.append(pos)
            pos += len(text)
            token_lps.append(None if entry is None else entry[tid])
            tops.append(
                None if entry is None else {self._token_text(k): v for k, v in entry.items()}
            )
        return {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        params = self.completion_params(req)
        if req.echo:
            raise InvalidRequestError("echo is not supported with stream")
        rid, streams = await self._start(completion_prompts(req), params, "cmpl")
        return self._completion_events(req, rid, streams)

    async def _completion_events(self, req, rid, streams) -> AsyncIterator[str]:
        created, prompt_tokens, completion_tokens = int(time.time()), {}, 0
        async for i, out in merge_streams(streams):
            prompt_tokens[i] = len(out.prompt_token_ids)
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                lp = None
                if req.logprobs is not None and o.logprobs:
                    lp = self._completion_logprobs(o.token_ids, o.logprobs, None)
                if o.text or o.finish_reason or lp:
                    yield sse(
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": created,
                            "model": self.model_name,
                            "choices": [
                                {
                                    "index": i * req.n + o.index,
                                    "text": o.text,
                                    "logprobs": lp,
                                    "finish_reason": o.finish_reason,
                                }
                            ],
                        }
                    )
        if req.stream_options and req.stream_options.get("include_usage"):
            p = sum(prompt_tokens.values())
            yield sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.model_name,
                    "choices": [],
                    "usage": Usage(
                        prompt_tokens=p,
                        completion_tokens=completion_tokens,
                        total_tokens=p + completion_tokens,
                    ).model_dump(),
                }
            )
        yield "data: [DONE]\n\n"

    def _usage(self, prompts_out: dict, choices: dict) -> Usage:
        p = sum(len(o.prompt_token_ids) for o in prompts_out.values())
        c = sum(len(ch.token_ids) for ch in choices.values())
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
