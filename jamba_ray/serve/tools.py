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

START, END = "<tool_calls>", "</tool_calls>"
# Calls are compact JSON (as the template renders them): a forced call gets no runs of whitespace.


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
            "content": {"type": "json_schema", "json_schema": array, "max_whitespace_cnt": 1},
            "end": END,
        },
    }
    return StructuredOutputs(structural_tag=json.dumps(tag), tokenizer=tokenizer)


def _call_schema(tool) -> dict:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
    }


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a whole reply; a reply whose calls do not parse stays content."""
    at = text.find(START)
    if at == -1:
        return text, []
    end = text.find(END, at)
    body = text[at + len(START) : end if end != -1 else len(text)]
    try:
        calls = json.loads(body)
        calls = [_call(i, c["name"], c["arguments"]) for i, c in enumerate(calls)]
    except (json.JSONDecodeError, TypeError, KeyError):
        return text, []
    content = text[:at]
    return (content if content.strip() else None), calls


def _call(index: int, name: str, arguments) -> dict:
    if not isinstance(name, str):
        raise TypeError("tool name must be a string")
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def message_calls(calls: list[dict]) -> list[dict]:
    """Calls as in a (non-streamed) assistant message: without the stream index."""
    return [{k: v for k, v in c.items() if k != "index"} for c in calls]


class ToolStream:
    """Splits a streamed reply into content deltas and whole tool calls: text that may begin the
    start tag is held back; each call block goes out whole once its end tag (or the end) comes."""

    def __init__(self):
        self.buffer, self.inside, self.count = "", False, 0

    def push(self, delta: str) -> tuple[str, list[dict]]:
        self.buffer += delta
        content, calls = "", []
        while True:
            if not self.inside:
                at = self.buffer.find(START)
                cut = at if at != -1 else len(self.buffer) - _prefix_len(self.buffer, START)
                content, self.buffer = content + self.buffer[:cut], self.buffer[cut:]
                if at == -1:
                    return content, calls
                self.inside = True
            end = self.buffer.find(END)
            if end == -1:
                return content, calls
            block, self.buffer = self.buffer[: end + len(END)], self.buffer[end + len(END) :]
            self.inside = False
            text, found = self._parse(block)
            content, calls = content + text, calls + found

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the reply: a block never closed is parsed as it stands, else content."""
        block, self.buffer = self.buffer, ""
        return self._parse(block) if self.inside else (block, [])

    def _parse(self, block: str) -> tuple[str, list[dict]]:
        _, calls = parse(block)
        if not calls:
            return block, []
        for c in calls:
            c["index"], self.count = self.count, self.count + 1
        return "", calls


def _prefix_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (it may still become the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
