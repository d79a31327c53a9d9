"""Structured-output fields of a request -> one `StructuredOutputs` for the engine.

OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` object and its
older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` all land here; at most
one of them may constrain a request. The grammar is checked (xgrammar parses it) before anything
is queued, so a bad schema or regex is a 400 naming its field.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine.sampling_params import StructuredOutputs
from ..errors import InvalidRequestError

GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_outputs(req, tokenizer: str | None) -> StructuredOutputs | None:
    """The request's one constraint (None when it has none); `tokenizer` names the vocabulary."""
    found = _response_format(req) + _vllm(req) + _guided(req)
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidRequestError(f"give one structured-output constraint, not {names}")
    if not found:
        return None
    field, kwargs = found[0]
    return build(field, kwargs, tokenizer)


def build(field: str, kwargs: dict, tokenizer: str | None) -> StructuredOutputs:
    try:
        return StructuredOutputs(**kwargs, tokenizer=tokenizer)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{field}: {e}", field) from None


def _response_format(req) -> list[tuple[str, dict]]:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return []
    if rf.type == "json_object":
        return [("response_format", {"json_object": True})]
    if rf.json_schema is None:
        raise InvalidRequestError(
            "response_format of type json_schema needs a 'json_schema' object", "response_format"
        )
    return [("response_format", {"json": as_json(rf.json_schema.schema_)})]


def _vllm(req) -> list[tuple[str, dict]]:
    so = req.structured_outputs
    if so is None:
        return []
    kinds = {
        "json": as_json(so.json_) if so.json_ is not None else None,
        "regex": so.regex,
        "choice": so.choice,
        "grammar": so.grammar,
        "json_object": so.json_object or None,
        "structural_tag": as_json(so.structural_tag) if so.structural_tag is not None else None,
    }
    given = {k: v for k, v in kinds.items() if v is not None}
    if len(given) != 1:
        raise InvalidRequestError(
            f"structured_outputs takes exactly one of {', '.join(kinds)}", "structured_outputs"
        )
    return [("structured_outputs", {**given, "any_whitespace": not so.disable_any_whitespace})]


def _guided(req) -> list[tuple[str, dict]]:
    found = []
    for field, kind in GUIDED.items():
        value = getattr(req, field)
        if value is not None:
            found.append((field, {kind: as_json(value) if kind == "json" else value}))
    if req.guided_decoding_backend and not found:
        raise InvalidRequestError(
            "guided_decoding_backend without a guided_* constraint", "guided_decoding_backend"
        )
    return found


def as_json(value: str | dict[str, Any]) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
