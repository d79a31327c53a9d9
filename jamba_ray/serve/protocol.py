"""OpenAI-compatible request/response models at the wire boundary (pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; known ones are validated.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="served model name (see GET /v1/models)")
    max_tokens: int | None = Field(None, description="tokens to generate at most")
    temperature: float = Field(1.0, description="0 is greedy")
    top_p: float = 1.0
    n: int = Field(1, description="completions per prompt; forks the prompt's state after prefill")
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, description='{"include_usage": true}')
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, texts or token ids"
    )
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, description="top-k logprobs per token (0..20)")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
