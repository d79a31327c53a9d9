"""OpenAI-compatible request/response models at the wire boundary (pydantic)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import InvalidRequestError

# Fields OpenAI or vLLM define that this server does not implement: refused by name (with why)
# whenever they carry a value, never dropped. Any other unknown field is refused too (forbid).
UNSUPPORTED = {
    "suffix": "insertion (suffix) is not supported",
    "logit_bias": "logit_bias is not supported",
    "functions": "the deprecated functions API is not supported; use tools",
    "function_call": "the deprecated functions API is not supported; use tool_choice",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "store": "stored completions are not supported",
    "metadata": "stored completions (metadata) are not supported",
    "service_tier": "service tiers are not supported",
    "reasoning_effort": "reasoning_effort is not supported",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty (beam search) is not supported",
    "include_stop_str_in_output": "include_stop_str_in_output is not supported",
    "bad_words": "bad_words is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not supported",
    "guided_whitespace_pattern": "use disable_any_whitespace instead",
    "logits_processors": "custom logits processors are not supported",
    "return_tokens_as_token_ids": "return_tokens_as_token_ids is not supported",
    "chat_template": "a per-request chat template is not supported",
    "documents": "documents are not supported",
    "mm_processor_kwargs": "multimodal inputs are not supported",
    "echo": "echo is supported on /v1/completions only",
    "spaces_between_special_tokens": "spaces_between_special_tokens is not supported",
}
# Values of those fields that ask for nothing (vLLM's defaults): accepted and dropped.
HARMLESS = {"length_penalty": 1.0, "spaces_between_special_tokens": True}


class Wire(BaseModel):
    """A misspelt or unknown field is a 400 that names it, never silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        refused = [k for k in data if k in UNSUPPORTED and k not in cls.model_fields]
        for name in refused:
            if data[name] not in _UNSET and data[name] != HARMLESS.get(name, None):
                raise InvalidRequestError(f"'{name}': {UNSUPPORTED[name]}", name)
        return {k: v for k, v in data.items() if k not in refused}  # (only empty values left)


_UNSET = (None, False, "", [], {})


class StreamOptions(Wire):
    include_usage: bool = Field(False, description="a last chunk with the usage")
    continuous_usage_stats: bool = Field(
        False, description="with include_usage: the usage so far in every chunk (vLLM)"
    )


class JsonSchema(Wire):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema to follow")
    strict: bool | None = Field(None, description="always enforced: the output follows the schema")


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputsRequest(Wire):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: str | dict[str, Any] | None = Field(None, alias="json", description="a JSON schema")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="EBNF (xgrammar dialect)")
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = Field(None, description="xgrammar's format")
    disable_any_whitespace: bool = False
    disable_fallback: bool = Field(False, description="one backend (xgrammar): never falls back")


class _Request(Wire):
    model: str = Field(description="served model name (see GET /v1/models)")
    max_tokens: int | None = Field(None, description="tokens to generate at most")
    temperature: float = Field(1.0, description="0 is greedy")
    top_p: float = 1.0
    n: int = Field(1, description="completions per prompt; forks the prompt's state after prefill")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = Field(None, description="the caller's end-user id (logged nowhere)")
    # vLLM's extra sampling fields
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, description="top-k logprobs per prompt token")
    priority: int = Field(0, description="lower runs first (vLLM's priority scheduling)")
    cache_salt: str | None = Field(
        None, description="only requests with the same salt share cached prefixes (non-empty)"
    )
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_*
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: Literal["xgrammar", "auto"] | None = None

    @model_validator(mode="after")
    def _options_need_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options requires stream=true", "stream_options")
        return self


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, texts or token ids"
    )
    max_tokens: int | None = Field(16, description="0 with echo: score the prompt only")
    logprobs: int | None = Field(None, description="top-k logprobs per token (0..20)")
    echo: bool = False
    best_of: int | None = Field(None, description="only equal to n (no reranking)")
    add_special_tokens: bool = Field(True, description="BOS before text prompts")


class FunctionCall(Wire):
    name: str
    arguments: str | dict[str, Any] = Field(description="JSON text (or an object)")


class ToolCall(Wire):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Wire):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        kinds = {p.get("type") for p in self.content} - {"text"}
        if kinds:
            raise InvalidRequestError(
                f"only text content parts are supported, not {sorted(kinds)}", "messages"
            )
        return "".join(p.get("text", "") for p in self.content)


class FunctionDef(Wire):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")
    strict: bool | None = Field(None, description="always enforced when a call is forced")


class Tool(Wire):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Wire):
    name: str


class NamedToolChoice(Wire):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(False, description="extend the last (assistant) message")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra template vars")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = Field(True, description="false: at most one call per reply")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens resumed from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
