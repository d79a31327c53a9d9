"""/v1/completions: prompts (text or token ids), echo and prompt scoring, logprobs with offsets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..engine.outputs import CompletionOutput, accumulate
from ..engine.sampling_params import SamplingParams
from ..errors import InvalidRequestError
from .logprobs import Offsets, completion_logprobs, prompt_logprobs
from .protocol import CompletionRequest
from .translate import completion_prompts, merge_streams, most, sampling_params, sse, stream_usage
from .translate import usage as usage_dict


class CompletionServing:
    """Mixed into OpenAIServing: expects `tok`, `model_name`, `_start`, `_usage`, `_token_text`,
    `_structured`."""

    def completion_params(self, req: CompletionRequest) -> SamplingParams:
        if req.best_of not in (None, req.n):
            raise InvalidRequestError("best_of must equal n (or be omitted)", "best_of")
        if req.max_tokens == 0 and not req.echo:
            raise InvalidRequestError("max_tokens=0 scores the prompt: it needs echo", "max_tokens")
        echo_lp = req.logprobs if req.echo else None
        # max_tokens=0 (score the prompt): one token is drawn, and dropped from the reply.
        max_tokens = 1 if req.max_tokens == 0 else req.max_tokens
        prompt_lp = most(echo_lp, req.prompt_logprobs)
        return sampling_params(req, max_tokens, req.logprobs, prompt_lp, self._structured(req))

    async def _start_completion(self, req: CompletionRequest):
        params = self.completion_params(req)
        prompts = completion_prompts(req)
        return await self._start(prompts, params, "cmpl", req.add_special_tokens)

    async def completion(self, req: CompletionRequest) -> dict:
        rid, streams = await self._start_completion(req)
        choices: dict[int, CompletionOutput] = {}
        prompts_out: dict[int, object] = {}
        async for i, out in merge_streams(streams):
            prompts_out[i] = out
            for o in out.outputs:
                accumulate(choices, i * req.n + o.index, o)
        if req.max_tokens == 0:
            for c in choices.values():
                _drop_generated(c)
        body = [
            self._completion_choice(req, idx, choices[idx], prompts_out[idx // req.n])
            for idx in sorted(choices)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": body,
            "usage": self._usage(prompts_out, choices).model_dump(),
        }

    def _completion_choice(self, req: CompletionRequest, idx: int, c: CompletionOutput, out):
        ids, entries, starts, prefix = [], [], [], ""
        if req.echo:  # the prompt as text (special tokens skipped), then the completion
            echo = Offsets(self.tok)
            ids, starts = list(out.prompt_token_ids), echo.push(out.prompt_token_ids)
            entries, prefix = list(out.prompt_logprobs or [None] * len(ids)), echo.text()
        starts += Offsets(self.tok, req.skip_special_tokens, len(prefix)).push(c.token_ids)
        choice = {"index": idx, "text": prefix + c.text, "logprobs": None}
        if req.logprobs is not None:
            ids, entries = ids + list(c.token_ids), entries + list(c.logprobs or [])
            choice["logprobs"] = completion_logprobs(
                self._token_text, ids, entries, starts, req.logprobs
            )
        choice["finish_reason"] = c.finish_reason
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(out, req.prompt_logprobs)
        return choice

    def _prompt_logprobs(self, out, k: int) -> list | None:
        if out.prompt_logprobs is None:
            return None
        return prompt_logprobs(self._token_text, out.prompt_token_ids, out.prompt_logprobs, k)

    async def completion_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        if req.echo:
            raise InvalidRequestError("echo is not supported with stream", "echo")
        rid, streams = await self._start_completion(req)
        return self._completion_events(req, rid, streams)

    async def _completion_events(self, req, rid, streams) -> AsyncIterator[str]:
        head = {"id": rid, "object": "text_completion", "created": int(time.time())}
        head["model"] = self.model_name
        with_usage, continuous = stream_usage(req)
        prompt_tokens, cached, completion_tokens = {}, {}, 0
        offsets: dict[int, Offsets] = {}  # per choice: text offsets carry on across chunks
        async for i, out in merge_streams(streams):
            prompt_tokens[i] = len(out.prompt_token_ids)
            cached[i] = out.num_cached_tokens
            for o in out.outputs:
                idx = i * req.n + o.index
                completion_tokens += len(o.token_ids)
                choice = {"index": idx, "text": o.text, "logprobs": None}
                if req.logprobs is not None and o.logprobs:
                    if idx not in offsets:
                        offsets[idx] = Offsets(self.tok, req.skip_special_tokens)
                    at = offsets[idx]
                    choice["logprobs"] = completion_logprobs(
                        self._token_text,
                        o.token_ids,
                        o.logprobs,
                        at.push(o.token_ids),
                        req.logprobs,
                    )
                choice["finish_reason"] = o.finish_reason
                if req.prompt_logprobs is not None and out.finished:
                    choice["prompt_logprobs"] = self._prompt_logprobs(out, req.prompt_logprobs)
                if o.text or o.finish_reason or choice["logprobs"]:
                    chunk = {**head, "choices": [choice]}
                    if continuous:
                        chunk["usage"] = usage_dict(
                            sum(prompt_tokens.values()), completion_tokens, sum(cached.values())
                        )
                    yield sse(chunk)
        if with_usage:
            p = sum(prompt_tokens.values())
            done = usage_dict(p, completion_tokens, sum(cached.values()))
            yield sse({**head, "choices": [], "usage": done})
        yield "data: [DONE]\n\n"


def _drop_generated(c: CompletionOutput) -> None:
    """Prompt scoring (max_tokens=0): the one token drawn is not part of the reply."""
    c.text, c.token_ids, c.finish_reason = "", [], "length"
    c.logprobs = [] if c.logprobs is not None else None
