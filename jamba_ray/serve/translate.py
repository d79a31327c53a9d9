"""OpenAI request fields -> engine terms (SamplingParams, prompts, limits), and stream helpers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..engine.sampling_params import SamplingParams
from ..errors import InvalidRequestError
from .protocol import CompletionRequest, PromptTokensDetails, Usage


@dataclass(frozen=True, slots=True)
class Limits:
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Fields:
    """The request fields that a prompt-size error names (chat: messages, max_completion_tokens)."""

    prompt: str = "prompt"
    max_tokens: str = "max_tokens"


def sampling_params(
    req, max_tokens: int | None, logprobs: int | None, prompt_logprobs=None, structured=None
) -> SamplingParams:
    return SamplingParams(
        n=req.n,
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        min_tokens=req.min_tokens,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
        structured=structured,
        priority=req.priority,
        cache_salt=req.cache_salt,
    )


def most(*ks: int | None) -> int | None:
    """The larger of several optional top-k counts (None when none is asked for)."""
    given = [k for k in ks if k is not None]
    return max(given) if given else None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    ).model_dump()


def stream_usage(req) -> tuple[bool, bool]:
    """(a last chunk with the usage, the usage so far in every chunk too)."""
    opts = req.stream_options
    if opts is None or not opts.include_usage:
        return False, False
    return True, opts.continuous_usage_stats


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise InvalidRequestError("prompt must not be empty")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def check_limits(
    limits: Limits, prompt_len: int, max_tokens: int | None, model_len: int, fields: Fields
) -> None:
    """The server's limits and the model's context, each error naming its field."""
    if limits.max_prompt_tokens and prompt_len > limits.max_prompt_tokens:
        raise InvalidRequestError(
            f"prompt has {prompt_len} tokens, more than this server's limit of "
            f"{limits.max_prompt_tokens}",
            fields.prompt,
        )
    if prompt_len >= model_len:
        raise InvalidRequestError(
            f"prompt has {prompt_len} tokens; this model's maximum context length is {model_len}",
            fields.prompt,
        )
    if limits.max_tokens_limit and max_tokens and max_tokens > limits.max_tokens_limit:
        raise InvalidRequestError(
            f"{fields.max_tokens}={max_tokens} exceeds this server's limit of "
            f"{limits.max_tokens_limit}",
            fields.max_tokens,
        )
    if max_tokens and prompt_len + max_tokens > model_len:
        raise InvalidRequestError(
            f"prompt ({prompt_len} tokens) + {fields.max_tokens} ({max_tokens}) exceeds this "
            f"model's maximum context length of {model_len} tokens",
            fields.max_tokens,
        )


async def merge_streams(streams: list) -> AsyncIterator[tuple[int, object]]:
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


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
