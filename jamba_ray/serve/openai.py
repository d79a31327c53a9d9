"""OpenAI-compatible completions and chat over the AsyncEngine: request -> engine -> JSON / SSE."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..engine.outputs import CompletionOutput, accumulate
from ..engine.sampling_params import SamplingParams
from ..errors import InvalidRequestError
from .protocol import ChatCompletionRequest, CompletionRequest, Usage


@dataclass(frozen=True, slots=True)
class Limits:
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None


def sampling_params(req, max_tokens: int | None, logprobs: int | None, prompt_logprobs=None) -> SamplingParams:
    if req.logit_bias:
        raise InvalidRequestError("logit_bias is not supported")
    return SamplingParams(
        n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        min_p=req.min_p, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
        min_tokens=req.min_tokens, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
    )


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise InvalidRequestError("prompt must not be empty")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def check_limits(limits: Limits, prompt_len: int, max_tokens: int | None) -> None:
    if limits.max_prompt_tokens and prompt_len > limits.max_prompt_tokens:
        raise InvalidRequestError(
            f"prompt has {prompt_len} tokens, more than this server's limit of {limits.max_prompt_tokens}"
        )
    if limits.max_tokens_limit and max_tokens and max_tokens > limits.max_tokens_limit:
        raise InvalidRequestError(
            f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens_limit}"
        )


async def _merge(streams: list) -> AsyncIterator[tuple[int, object]]:
    """Interleave several request streams: yields (prompt index, RequestOutput)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:  # surfaced to the consumer below
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    done = 0
    try:
        while done < len(streams):
            i, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()


class OpenAIServing:
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
        async for i, out in _merge(streams):
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
            body.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": body, "usage": usage.model_dump()}

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
            tops.append(None if entry is None else {self._token_text(k): v for k, v in entry.items()})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        params = self.completion_params(req)
        if req.echo:
            raise InvalidRequestError("echo is not supported with stream")
        rid, streams = await self._start(completion_prompts(req), params, "cmpl")
        return self._completion_events(req, rid, streams)

    async def _completion_events(self, req, rid, streams) -> AsyncIterator[str]:
        created, prompt_tokens, completion_tokens = int(time.time()), {}, 0
        async for i, out in _merge(streams):
            prompt_tokens[i] = len(out.prompt_token_ids)
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                lp = None
                if req.logprobs is not None and o.logprobs:
                    lp = self._completion_logprobs(o.token_ids, o.logprobs, None)
                if o.text or o.finish_reason or lp:
                    yield _sse({"id": rid, "object": "text_completion", "created": created,
                                "model": self.model_name, "choices": [{
                                    "index": i * req.n + o.index, "text": o.text, "logprobs": lp,
                                    "finish_reason": o.finish_reason}]})
        if req.stream_options and req.stream_options.get("include_usage"):
            p = sum(prompt_tokens.values())
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                        "choices": [], "usage": Usage(prompt_tokens=p, completion_tokens=completion_tokens,
                                                      total_tokens=p + completion_tokens).model_dump()})
        yield "data: [DONE]\n\n"

    def _usage(self, prompts_out: dict, choices: dict) -> Usage:
        p = sum(len(o.prompt_token_ids) for o in prompts_out.values())
        c = sum(len(ch.token_ids) for ch in choices.values())
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    # ---- /v1/chat/completions ---------------------------------------------------------------
    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=req.add_generation_prompt)
        except Exception as e:
            raise InvalidRequestError(f"cannot apply the chat template: {e}") from None
        return self.tok(text, add_special_tokens=False).input_ids

    def chat_params(self, req: ChatCompletionRequest) -> SamplingParams:
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true")
        return sampling_params(req, req.max_completion_tokens or req.max_tokens, (top or 0) if req.logprobs else None)

    async def chat(self, req: ChatCompletionRequest) -> dict:
        rid, streams = await self._start([self.chat_prompt(req)], self.chat_params(req), "chatcmpl")
        choices: dict[int, CompletionOutput] = {}
        last = None
        async for _, out in _merge(streams):
            last = out
            for o in out.outputs:
                accumulate(choices, o.index, o)
        body = [{"index": i, "message": {"role": "assistant", "content": choices[i].text},
                 "logprobs": self._chat_logprobs(choices[i].token_ids, choices[i].logprobs, req.top_logprobs or 0)
                 if req.logprobs else None,
                 "finish_reason": choices[i].finish_reason} for i in sorted(choices)]
        usage = self._usage({0: last}, choices)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": body, "usage": usage.model_dump()}

    def _chat_logprobs(self, token_ids: list[int], logprobs, k: int) -> dict:
        def item(tid: int, lp: float) -> dict:
            text = self._token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        content = []
        for tid, entry in zip(token_ids, logprobs or []):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            content.append({**item(tid, entry[tid]), "top_logprobs": [item(t, v) for t, v in top]})
        return {"content": content}

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        rid, streams = await self._start([self.chat_prompt(req)], self.chat_params(req), "chatcmpl")
        return self._chat_events(req, rid, streams)

    async def _chat_events(self, req, rid, streams) -> AsyncIterator[str]:
        created, head = int(time.time()), {"id": rid, "object": "chat.completion.chunk", "model": self.model_name}
        for i in range(req.n):
            yield _sse({**head, "created": created, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        prompt_tokens, completion_tokens = 0, 0
        async for _, out in _merge(streams):
            prompt_tokens = len(out.prompt_token_ids)
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                if o.text or o.finish_reason:
                    delta = {"content": o.text} if o.text else {}
                    lp = None
                    if req.logprobs and o.logprobs:
                        lp = self._chat_logprobs(o.token_ids, o.logprobs, req.top_logprobs or 0)
                    yield _sse({**head, "created": created, "choices": [
                        {"index": o.index, "delta": delta, "logprobs": lp, "finish_reason": o.finish_reason}]})
        if req.stream_options and req.stream_options.get("include_usage"):
            yield _sse({**head, "created": created, "choices": [], "usage": Usage(
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens).model_dump()})
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
