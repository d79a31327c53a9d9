"""/v1/chat/completions: the chat template (tools and tool results included), assistant messages
with tool calls, and chunk deltas."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

from ..engine.outputs import CompletionOutput, accumulate
from ..engine.sampling_params import SamplingParams
from ..errors import InvalidRequestError
from . import tools
from .logprobs import chat_logprobs, prompt_logprobs
from .protocol import ChatCompletionRequest
from .tool_stream import ToolStream
from .translate import Fields, merge_streams, sampling_params, sse, stream_usage
from .translate import usage as usage_dict


class ChatServing:
    """Mixed into OpenAIServing: expects `tok`, `model_name`, `_start`, `_usage`, `_token_text`,
    `_structured`."""

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tools.check_tools(req)
        if req.continue_final_message and req.add_generation_prompt:
            if "add_generation_prompt" in req.model_fields_set:
                raise InvalidRequestError(
                    "continue_final_message and add_generation_prompt exclude each other",
                    "continue_final_message",
                )
        messages = [tools.template_message(m) for m in req.messages]
        extra = dict(req.chat_template_kwargs or {})
        if req.tools:
            extra["tools"] = tools.template_tools(req)
        try:
            text = self.tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message,
                **extra,
            )
        except Exception as e:
            raise InvalidRequestError(f"cannot apply the chat template: {e}") from None
        return self.tok(text, add_special_tokens=False).input_ids

    def chat_params(self, req: ChatCompletionRequest) -> SamplingParams:
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true", "top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        structured = self._structured(req)
        forced = tools.forced(req, self.tok.name_or_path)
        if structured is not None and forced is not None:
            raise InvalidRequestError(
                "a forced tool_choice cannot be combined with a structured-output constraint",
                "tool_choice",
            )
        try:
            params = sampling_params(
                req, _max_tokens(req), top, req.prompt_logprobs, structured or forced
            )
        except InvalidRequestError as e:  # SamplingParams' names -> this route's fields
            raise InvalidRequestError(str(e), _chat_field(req, e.param)) from None
        if tools.calls_parsed(req) and tools.tags_are_special(self.tok):
            params = replace(params, skip_special_tokens=False)
        return params

    async def _start_chat(self, req: ChatCompletionRequest):
        fields = Fields("messages", _chat_field(req, "max_tokens"))
        prompt, params = self.chat_prompt(req), self.chat_params(req)
        return await self._start([prompt], params, "chatcmpl", fields=fields)

    async def chat(self, req: ChatCompletionRequest) -> dict:
        rid, streams = await self._start_chat(req)
        choices: dict[int, CompletionOutput] = {}
        last = None
        async for _, out in merge_streams(streams):
            last = out
            for o in out.outputs:
                accumulate(choices, o.index, o)
        body = [self._chat_choice(req, i, choices[i]) for i in sorted(choices)]
        reply = {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": body,
            "usage": self._usage({0: last}, choices).model_dump(),
        }
        if req.prompt_logprobs is not None:
            reply["prompt_logprobs"] = self._chat_prompt_logprobs(req, last)
        return reply

    def _chat_choice(self, req: ChatCompletionRequest, i: int, c: CompletionOutput) -> dict:
        message, reason = {"role": "assistant", "content": c.text}, c.finish_reason
        if tools.calls_parsed(req):
            content, calls = tools.parse(c.text, partial=tools.forced_choice(req))
            if calls:
                message = {"role": "assistant", "content": content}
                message["tool_calls"] = tools.message_calls(calls)
                reason = _calls_reason(req, reason)
        lp = None
        if req.logprobs:
            lp = chat_logprobs(self._token_text, c.token_ids, c.logprobs, req.top_logprobs or 0)
        return {"index": i, "message": message, "logprobs": lp, "finish_reason": reason}

    def _chat_prompt_logprobs(self, req: ChatCompletionRequest, out) -> list | None:
        if out is None or out.prompt_logprobs is None:
            return None
        ids, entries = out.prompt_token_ids, out.prompt_logprobs
        return prompt_logprobs(self._token_text, ids, entries, req.prompt_logprobs)

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        rid, streams = await self._start_chat(req)
        return self._chat_events(req, rid, streams)

    async def _chat_events(self, req, rid, streams) -> AsyncIterator[str]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time())}
        head["model"] = self.model_name
        for i in range(req.n):
            first = {"index": i, "delta": {"role": "assistant", "content": ""}}
            yield sse({**head, "choices": [{**first, "finish_reason": None}]})
        with_usage, continuous = stream_usage(req)
        forced = tools.forced_choice(req)
        parsers = {i: ToolStream(forced) for i in range(req.n)} if tools.calls_parsed(req) else {}
        called: set[int] = set()
        prompt_tokens, completion_tokens, cached = 0, 0, 0
        async for _, out in merge_streams(streams):
            prompt_tokens, cached = len(out.prompt_token_ids), out.num_cached_tokens
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                choice = self._chat_delta(req, o, parsers.get(o.index), called)
                if choice is None:
                    continue
                chunk = {**head, "choices": [choice]}
                if continuous:
                    chunk["usage"] = usage_dict(prompt_tokens, completion_tokens, cached)
                if req.prompt_logprobs is not None and out.finished:
                    chunk["prompt_logprobs"] = self._chat_prompt_logprobs(req, out)
                yield sse(chunk)
        if with_usage:
            yield sse(
                {
                    **head,
                    "choices": [],
                    "usage": usage_dict(prompt_tokens, completion_tokens, cached),
                }
            )
        yield "data: [DONE]\n\n"

    def _chat_delta(self, req, o: CompletionOutput, parser, called: set[int]) -> dict | None:
        """One choice's chunk (None when there is nothing to send yet)."""
        text, calls = parser.push(o.text) if parser else (o.text, [])
        if parser and o.finish_reason:
            rest, more = parser.finish()
            text, calls = text + rest, calls + more
        delta = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = calls
            called.add(o.index)
        lp = None
        if req.logprobs and o.logprobs:
            lp = chat_logprobs(self._token_text, o.token_ids, o.logprobs, req.top_logprobs or 0)
        reason = o.finish_reason
        if reason and o.index in called:
            reason = _calls_reason(req, reason)
        if not (delta or reason or lp):
            return None
        return {"index": o.index, "delta": delta, "logprobs": lp, "finish_reason": reason}


def _max_tokens(req: ChatCompletionRequest) -> int | None:
    """max_completion_tokens wins over the deprecated max_tokens (0 is a value, and refused)."""
    given = req.max_completion_tokens
    return given if given is not None else req.max_tokens


def _chat_field(req: ChatCompletionRequest, param: str | None) -> str | None:
    """A SamplingParams name as this route calls it."""
    if param == "max_tokens" and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "top_logprobs" if param == "logprobs" else param


def _calls_reason(req: ChatCompletionRequest, reason: str | None) -> str | None:
    """A reply that ended in tool calls finishes with "tool_calls" (a named choice: "stop")."""
    return "tool_calls" if reason == "stop" and tools.named(req) is None else reason
