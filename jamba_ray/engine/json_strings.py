"""JSON schemas rewritten so that every string the grammar allows is a legal JSON string.

xgrammar writes an unbounded string as `[^\\0-\\x1f"\\\\] | escape`, but a string with
`minLength` / `maxLength` (and a property name under `propertyNames` with them) as
`[^"\\\\\\r\\n]{m,n}`: raw U+0000-U+001F other than CR and LF pass, which RFC 8259 forbids and
`json.loads` rejects. Such a string becomes a `pattern` of the same length that excludes them (a
pattern is matched on the string's characters; xgrammar writes no escapes in either form). Pure
Python: no xgrammar here.
"""

from __future__ import annotations

from typing import Any

# JSON Schema keywords whose values are schemas, lists of schemas, or maps of name -> schema.
ONE = ("additionalProperties", "items", "contains", "propertyNames", "not", "if", "then", "else",
       "additionalItems", "unevaluatedProperties", "unevaluatedItems")  # fmt: skip
MANY = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# What a bounded string's characters may be: no control character, quote or backslash, and no
# UTF-8-encoded surrogate (xgrammar takes one as a character; it decodes to three U+FFFD, past
# maxLength).
CHARACTER = r'[^\x00-\x1f"\\\ud800-\udfff]'


def strict_strings(schema: Any) -> Any:
    """The schema with each length-bounded string given a pattern of legal characters."""
    if not isinstance(schema, dict):
        return schema  # (true / false schemas)
    out = dict(schema)
    for key in ONE:
        if isinstance(out.get(key), dict):
            out[key] = strict_strings(out[key])
    for key in MANY:
        if isinstance(out.get(key), list):
            out[key] = [strict_strings(s) for s in out[key]]
    for key in NAMED:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_strings(s) for name, s in out[key].items()}
    if _bounded_string(out):
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{CHARACTER}{{{low},{high}}}$"
    return out


def _bounded_string(schema: dict) -> bool:
    """A string bounded by length alone (a pattern or format already writes its characters;
    enum and const list them)."""
    if not ({"minLength", "maxLength"} & schema.keys()):
        return False
    if {"pattern", "format", "enum", "const"} & schema.keys():
        return False
    kind = schema.get("type", "string")
    return kind == "string" or (isinstance(kind, list) and "string" in kind)


def strict_tag(node: Any) -> Any:
    """A structural tag (xgrammar's JSON form) with each JSON schema inside it made strict."""
    if isinstance(node, list):
        return [strict_tag(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and "json_schema" in node:
        return {**node, "json_schema": strict_strings(node["json_schema"])}
    if {"begin", "schema", "end"} <= node.keys():  # the legacy form: structures with schemas
        return {**node, "schema": strict_strings(node["schema"])}
    return {key: strict_tag(value) for key, value in node.items()}
