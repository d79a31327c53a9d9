"""A structured-output spec as an xgrammar grammar, and the check that refuses a bad one up front.

The grammar needs no tokenizer, so the engine checks a request's spec before anything is scheduled;
the last stage compiles the same grammar against its vocabulary (`model/grammar.py`). xgrammar is
imported only when a request has a spec.
"""

from __future__ import annotations

import json
import re

from ..errors import InvalidRequestError


def to_grammar(spec):
    """The spec (a `StructuredOutputs`) as an xgrammar Grammar."""
    import xgrammar as xgr

    if spec.json is not None:
        return xgr.Grammar.from_json_schema(spec.json, any_whitespace=spec.any_whitespace)
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
    return xgr.Grammar.from_structural_tag(spec.structural_tag)


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
