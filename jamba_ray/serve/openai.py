"""OpenAI-compatible completions and chat over an engine client: request -> engine -> JSON / SSE.

The shared part lives here; /v1/completions and /v1/chat/completions are mixins of their own.
"""

from __future__ import annotations

import uuid
from dataclasses import replace

from ..engine.sampling_params import SamplingParams, StructuredOutputs
from ..errors import InvalidRequestError
from .chat import ChatServing
from .completions import CompletionServing
from .protocol import PromptTokensDetails, Usage
from .structured import structured_outputs
from .translate import Fields, Limits, check_limits

PROMPT = Fields()  # /v1/completions' names


class OpenAIServing(ChatServing, CompletionServing):
    """Turns validated OpenAI requests into engine requests and engine outputs into responses."""

    def __init__(self, engine, model_name: str, limits: Limits):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.tok = engine.tokenizer

    # ---- shared -----------------------------------------------------------------------------
    async def _start(
        self, prompts, params: SamplingParams, prefix: str, special=True, fields=PROMPT
    ):
        """Validate everything, then queue every prompt; on any error nothing stays queued.
        `special`: text prompts get the tokenizer's special tokens (BOS); `fields`: the names
        errors about the prompt's size give."""
        encoded = [
            self.tok(p, add_special_tokens=special).input_ids if isinstance(p, str) and p else p
            for p in prompts
        ]
        card = self.engine.model_card()
        if params.n > card["max_num_seqs"]:
            raise InvalidRequestError(
                f"n={params.n} exceeds this server's {card['max_num_seqs']} state slots", "n"
            )
        for ids in encoded:
            size = len(ids) if isinstance(ids, list) else 0
            check_limits(self.limits, size, params.max_tokens, card["max_model_len"], fields)
        streams, rid = [], f"{prefix}-{uuid.uuid4().hex}"
        try:
            for i, p in enumerate(encoded):
                streams.append(await self.engine.generate(p, self._capped(params, p), f"{rid}-{i}"))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        return rid, streams

    def _capped(self, params: SamplingParams, ids) -> SamplingParams:
        """Without max_tokens: what the context allows, but never past the server's limit."""
        limit = self.limits.max_tokens_limit
        if params.max_tokens is not None or not limit or not isinstance(ids, list):
            return params
        room = self.engine.model_card()["max_model_len"] - len(ids)
        return replace(params, max_tokens=max(1, min(limit, room)))

    def _token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def _structured(self, req) -> StructuredOutputs | None:
        return structured_outputs(req, self.tok.name_or_path)

    def _usage(self, prompts_out: dict, choices: dict) -> Usage:
        p = sum(len(o.prompt_token_ids) for o in prompts_out.values())
        c = sum(len(ch.token_ids) for ch in choices.values())
        cached = sum(o.num_cached_tokens for o in prompts_out.values())
        return Usage(
            prompt_tokens=p,
            completion_tokens=c,
            total_tokens=p + c,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )
