"""A structured-output spec as an xgrammar grammar, and the check that refuses a bad one up front.

The grammar needs no tokenizer, so the engine checks a request's spec before anything is scheduled;
the last stage compiles the same grammar against its vocabulary (`model/grammar.py`). xgrammar is
imported only when a request has a spec.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from ..errors import InvalidRequestError
from .json_strings import strict_strings, strict_tag


def to_grammar(spec):
    """The spec (a `StructuredOutputs`) as an xgrammar Grammar; JSON strings are always legal."""
    import xgrammar as xgr

    if spec.json is not None:
        schema = _strict(spec.json, strict_strings)
        return xgr.Grammar.from_json_schema(schema, any_whitespace=spec.any_whitespace)
    if spec.json_object:  # any object: properties unconstrained
        return xgr.Grammar.from_json_schema(
            '{"type": "object"}', any_whitespace=spec.any_whitespace, strict_mode=False
        )
    if spec.regex is not None:
        return xgr.Grammar.from_regex(spec.regex)
    if spec.choice is not None:
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
    if spec.grammar is not None:
        return xgr.Grammar.from_ebnf(spec.grammar)
    tag = _strict(spec.structural_tag, strict_tag)
    if not spec.any_whitespace:
        tag = _strict(tag, _compact)
    return xgr.Grammar.from_structural_tag(tag)


def _strict(text: str, rewrite: Callable) -> str:
    """JSON text rewritten; text that is not JSON goes on as it is (xgrammar says why)."""
    try:
        return json.dumps(rewrite(json.loads(text)), ensure_ascii=False)
    except ValueError:
        return text


def _compact(node):
    """A structural tag whose JSON schemas allow no free whitespace: a tag's json_schema content
    has only max_whitespace_cnt, so each becomes the grammar any_whitespace=False gives (", " and
    ": " between items, as chat templates render tool calls)."""
    import xgrammar as xgr

    if isinstance(node, list):
        return [_compact(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and node.get("style", "json") == "json":
        schema = json.dumps(node["json_schema"], ensure_ascii=False)
        ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
        return {"type": "grammar", "grammar": ebnf}
    return {key: _compact(value) for key, value in node.items()}


def check(spec) -> None:
    """Raise InvalidRequestError (naming the spec's kind) if xgrammar cannot parse it."""
    try:
        to_grammar(spec)
    except Exception as e:
        raise InvalidRequestError(
            f"invalid {spec.kind} for structured outputs: {_why(e)}"
        ) from None


def _why(e: Exception) -> str:
    """xgrammar's message without its C++ source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)
    return text.replace("Check failed: (error.empty()) is false: ", "")
