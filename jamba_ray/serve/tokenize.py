"""vLLM's tokenizer routes: /tokenize (text or chat messages), /detokenize, /tokenizer_info."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from ..errors import InvalidRequestError
from .protocol import ChatCompletionRequest, ChatMessage, Tool, Wire


class TokenizeRequest(Wire):
    """vLLM's two tokenize requests in one: a `prompt`, or chat `messages` (via the template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        None, description="default: true for a prompt, false for messages (the template has BOS)"
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(Wire):
    model: str | None = None
    tokens: list[int]


def tokenize(serving, req: TokenizeRequest, max_model_len: int) -> dict:
    """{count, max_model_len, tokens, token_strs} as vLLM answers."""
    tok = serving.tok
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("give either prompt or messages", "prompt")
    if req.prompt is not None:
        ids = tok(req.prompt, add_special_tokens=req.add_special_tokens is not False).input_ids
    else:
        ids = serving.chat_prompt(_as_chat(req))
        if req.add_special_tokens:
            ids = tok.build_inputs_with_special_tokens(ids)
    strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def _as_chat(req: TokenizeRequest) -> ChatCompletionRequest:
    fields = {"add_generation_prompt", "continue_final_message", "tools", "chat_template_kwargs"}
    given = {k: getattr(req, k) for k in fields & req.model_fields_set}
    return ChatCompletionRequest(model=req.model or "", messages=req.messages, **given)


def detokenize(tok, req: DetokenizeRequest, vocab_size: int) -> dict:
    bad = [t for t in req.tokens if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token ids out of range [0, {vocab_size}): {bad[:5]}", "tokens")
    return {"prompt": tok.decode(req.tokens)}


def tokenizer_info(tok) -> dict:
    """The tokenizer's configuration (as in tokenizer_config.json), JSON-safe."""
    config = {k: v for k, v in tok.init_kwargs.items() if k not in ("name_or_path", "vocab_file")}
    config = json.loads(json.dumps(config, default=str))
    config["tokenizer_class"] = type(tok).__name__
    config["chat_template"] = tok.chat_template
    config["vocab_size"] = len(tok)
    return config
