"""Tool calling in Jamba's own format, the one vLLM's `jamba` tool parser reads:

    optional text<tool_calls>[{"name": "f", "arguments": {...}}, ...]</tool_calls>

`tool_choice`: "none" (no calls parsed), "auto" (the model decides), "required" or a named
function: those two are forced by a grammar (a structural tag: the tags around a JSON array of
calls whose arguments follow each tool's parameter schema), so the reply is always a well-formed
call. Tools, assistant `tool_calls` and tool results in the history reach the chat template.
"""

from __future__ import annotations

import json
import uuid

from ..engine.sampling_params import StructuredOutputs
from ..errors import InvalidRequestError
from .protocol import ChatCompletionRequest, ChatMessage
from .tool_scan import CallScanner

START, END = "<tool_calls>", "</tool_calls>"


def check_tools(req: ChatCompletionRequest) -> None:
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tool names must be unique", "tools")
    choice = req.tool_choice
    if choice not in (None, "none", "auto") and not names:
        raise InvalidRequestError("tool_choice requires tools", "tool_choice")
    name = named(req)
    if name is not None and name not in names:
        raise InvalidRequestError(f"tool_choice names an unknown tool '{name}'", "tool_choice")


def named(req: ChatCompletionRequest) -> str | None:
    choice = req.tool_choice
    return None if choice is None or isinstance(choice, str) else choice.function.name


def calls_parsed(req: ChatCompletionRequest) -> bool:
    """Whether replies are read for tool calls."""
    return bool(req.tools) and req.tool_choice != "none"


def tags_are_special(tok) -> bool:
    """Whether this tokenizer has the tags as special tokens (then replies must keep special
    tokens, or the tags vanish from the text, as vLLM's parser also arranges)."""
    ids = tok.convert_tokens_to_ids([START, END])
    added = tok.added_tokens_decoder
    return any(i in added and added[i].special for i in ids if i is not None)


def template_tools(req: ChatCompletionRequest) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None


def template_message(m: ChatMessage) -> dict:
    """A history message as chat templates read it (call arguments as objects, not JSON text)."""
    msg: dict = {"role": m.role, "content": m.text()}
    if m.name is not None:
        msg["name"] = m.name
    if m.tool_call_id is not None:
        msg["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name,
             "arguments": _arguments(c.function.arguments)}}
            for c in m.tool_calls
        ]  # fmt: skip
    return msg


def _arguments(args: str | dict) -> dict:
    if isinstance(args, dict):
        return args
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        raise InvalidRequestError("tool call arguments must be JSON", "messages") from None
    if not isinstance(value, dict):
        raise InvalidRequestError("tool call arguments must be a JSON object", "messages")
    return value


def forced(req: ChatCompletionRequest, tokenizer: str | None) -> StructuredOutputs | None:
    """The grammar behind tool_choice required / named (None otherwise)."""
    name = named(req)
    if req.tool_choice != "required" and name is None:
        return None
    tools = [t for t in req.tools if name is None or t.function.name == name]
    array = {"type": "array", "items": {"anyOf": [_call_schema(t) for t in tools]}, "minItems": 1}
    if name is not None or not req.parallel_tool_calls:
        array["maxItems"] = 1
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": START,
            "content": {"type": "json_schema", "json_schema": array},
            "end": END,
        },
    }
    # No free whitespace: calls come out as the template renders them, bounded by the schema.
    tag = json.dumps(tag)
    return StructuredOutputs(structural_tag=tag, any_whitespace=False, tokenizer=tokenizer)


def _call_schema(tool) -> dict:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
    }


def forced_choice(req: ChatCompletionRequest) -> bool:
    """Whether a grammar forces the reply to be calls (tool_choice required or named)."""
    return req.tool_choice == "required" or named(req) is not None


def parse(text: str, partial: bool = False) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a whole reply; a reply whose calls do not parse stays content,
    unless `partial` (a forced call cut short by max_tokens): then the calls named so far, each
    with its arguments as far as they came (JSON that may be incomplete)."""
    at = text.find(START)
    if at == -1:
        return text, []
    end = text.find(END, at)
    calls = read_calls(text[at + len(START) : end if end != -1 else len(text)], partial)
    if not calls:
        return text, []
    content = text[:at]
    return (content if content.strip() else None), calls


def read_calls(body: str, partial: bool = False, first: int = 0) -> list[dict]:
    """The calls of a block's body ([] when it is not a call array), numbered from `first`; their
    arguments are the model's own JSON text."""
    scan = CallScanner()
    scan.feed(body)
    if not (partial or well_formed(body)):
        return []
    named = [c for c in scan.calls if c.name is not None]
    return [call(first + i, c.name, scan.arguments(c)) for i, c in enumerate(named)]


def well_formed(body: str) -> bool:
    try:
        calls = json.loads(body)
    except json.JSONDecodeError:
        return False
    return isinstance(calls, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("name"), str)
        and isinstance(c.get("arguments"), dict)
        for c in calls
    )


def call(index: int, name: str, arguments: str) -> dict:
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def message_calls(calls: list[dict]) -> list[dict]:
    """Calls as in a (non-streamed) assistant message: without the stream index."""
    return [{k: v for k, v in c.items() if k != "index"} for c in calls]
