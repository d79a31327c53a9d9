"""/v1/chat/completions: the tokenizer's chat template, assistant messages and chunk deltas."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..engine.outputs import CompletionOutput, accumulate
from ..engine.sampling_params import SamplingParams
from ..errors import InvalidRequestError
from .protocol import ChatCompletionRequest, Usage
from .translate import merge_streams, sampling_params, sse


class ChatServing:
    """Mixed into OpenAIServing: expects `tok`, `model_name`, `_start`, `_usage`, `_token_text`."""

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=req.add_generation_prompt
            )
        except Exception as e:
            raise InvalidRequestError(f"cannot apply the chat template: {e}") from None
        return self.tok(text, add_special_tokens=False).input_ids

    def chat_params(self, req: ChatCompletionRequest) -> SamplingParams:
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true")
        return sampling_params(
            req, req.max_completion_tokens or req.max_tokens, (top or 0) if req.logprobs else None
        )

    async def chat(self, req: ChatCompletionRequest) -> dict:
        rid, streams = await self._start([self.chat_prompt(req)], self.chat_params(req), "chatcmpl")
        choices: dict[int, CompletionOutput] = {}
        last = None
        async for _, out in merge_streams(streams):
            last = out
            for o in out.outputs:
                accumulate(choices, o.index, o)
        body = [
            {
                "index": i,
                "message": {"role": "assistant", "content": choices[i].text},
                "logprobs": self._chat_logprobs(
                    choices[i].token_ids, choices[i].logprobs, req.top_logprobs or 0
                )
                if req.logprobs
                else None,
                "finish_reason": choices[i].finish_reason,
            }
            for i in sorted(choices)
        ]
        usage = self._usage({0: last}, choices)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": body,
            "usage": usage.model_dump(),
        }

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
        created, head = (
            int(time.time()),
            {"id": rid, "object": "chat.completion.chunk", "model": self.model_name},
        )
        for i in range(req.n):
            yield sse(
                {
                    **head,
                    "created": created,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ],
                }
            )
        prompt_tokens, completion_tokens = 0, 0
        async for _, out in merge_streams(streams):
            prompt_tokens = len(out.prompt_token_ids)
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                if o.text or o.finish_reason:
                    delta = {"content": o.text} if o.text else {}
                    lp = None
                    if req.logprobs and o.logprobs:
                        lp = self._chat_logprobs(o.token_ids, o.logprobs, req.top_logprobs or 0)
                    yield sse(
                        {
                            **head,
                            "created": created,
                            "choices": [
                                {
                                    "index": o.index,
                                    "delta": delta,
                                    "logprobs": lp,
                                    "finish_reason": o.finish_reason,
                                }
                            ],
                        }
                    )
        if req.stream_options and req.stream_options.get("include_usage"):
            yield sse(
                {
                    **head,
                    "created": created,
                    "choices": [],
                    "usage": Usage(
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens,
                    ).model_dump(),
                }
            )
        yield "data: [DONE]\n\n"
