"""Structured outputs at the last stage (xgrammar): even the random tiny model follows the grammar.

Real stages in-process (`backend: local`), the real xgrammar matcher and bitmask; the schemas are
bounded (enums, ranges, patterns) so that a random model finishes its JSON well within max_tokens.
"""

from __future__ import annotations

import functools
import json
import re

import jsonschema
import pytest

from jamba_ray import LLM, SamplingParams
from jamba_ray.engine.sampling_params import StructuredOutputs
from jamba_ray.errors import InvalidRequestError
from jamba_ray.model.grammar import Constraints

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}},
    },
    "required": ["name", "age", "ok", "tags"],
}
PROMPTS = ["hello", "The quick brown fox"]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    engine = LLM(tiny_ckpt, num_stages=2, backend="local", max_num_seqs=8, max_model_len=512)
    yield engine
    engine.shutdown()


def spec(llm, **kind) -> StructuredOutputs:
    return StructuredOutputs(**kind, tokenizer=llm.tokenizer.name_or_path)


def texts(llm, structured, temperature=0.0, n=1, max_tokens=300) -> list[str]:
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=5, n=n, structured=structured
    )
    outs = [c for o in llm.generate(PROMPTS, params) for c in o.outputs]
    assert all(c.finish_reason == "stop" for c in outs), [c.text for c in outs]
    return [c.text for c in outs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_greedy_and_sampled(llm, temperature):
    for text in texts(llm, spec(llm, json=json.dumps(PERSON)), temperature, n=2):
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_regex_choice_and_ebnf(llm):
    for text in texts(llm, spec(llm, json_object=True)):  # (free strings: sampled may run on)
        assert isinstance(json.loads(text), dict)
    for text in texts(llm, spec(llm, regex=r"[0-9]{3}-[a-z]{2}"), 1.0):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)
    for text in texts(llm, spec(llm, choice=("yes", "no", "maybe")), 1.0):
        assert text in ("yes", "no", "maybe")
    ebnf = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    for text in texts(llm, spec(llm, grammar=ebnf), 1.0):
        assert re.fullmatch(r"\([0-9](\+[0-9])*\)", text)


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(max_tokens=12, temperature=0)
    alone = llm.generate(PROMPTS, free)
    constrained = SamplingParams(
        max_tokens=300, temperature=0, structured=spec(llm, json=json.dumps(PERSON))
    )
    mixed = llm.generate(PROMPTS * 2, [free, free, constrained, constrained])
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids for o in alone]
    for o in mixed[2:]:
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)


def test_a_bad_grammar_is_refused_before_anything_runs(llm):
    with pytest.raises(InvalidRequestError, match="json"):
        spec(llm, json="{not json")
    with pytest.raises(InvalidRequestError, match="regex"):
        spec(llm, regex="[a-")
    with pytest.raises(InvalidRequestError, match="exactly one"):
        spec(llm, regex="a", choice=("a",))
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured=spec(llm, regex="a+"))


def test_a_replayed_sequence_catches_up_with_its_tokens(llm):
    """After a stage failure the sequence is registered again with the tokens it has: the new
    matcher replays them, so the mask continues where the old one was."""
    tok = llm.tokenizer
    s = spec(llm, choice=("alpha", "beta"))
    drawn = tuple(tok("al", add_special_tokens=False).input_ids)
    table = Constraints(tok.eos_token_id)
    table.admit(7, s, drawn)
    import torch

    logits = torch.zeros(1, len(tok))
    table.constrain([7], len(tok))(logits)
    allowed = [t for t in range(len(tok)) if logits[0, t] > float("-inf")]
    assert allowed and all("alpha".startswith("al" + tok.decode([t])) for t in allowed)


# ---- JSON strings are legal JSON on every schema path -------------------------------------------
CONTROLS = ["\x00", "\x10", "\x1f", "\t", "\n"]
STRING_PATHS = {  # a schema -> a document whose one string holds {c}
    "string": ({"type": "string"}, '"a{c}b"'),
    "maxLength": ({"type": "string", "maxLength": 8}, '"a{c}b"'),
    "minLength": ({"type": "string", "minLength": 1}, '"a{c}b"'),
    "property": (
        {"type": "object", "properties": {"s": {"maxLength": 5}}, "required": ["s"]},
        '{{"s": "a{c}"}}',
    ),
    "propertyNames": ({"type": "object", "propertyNames": {"maxLength": 5}}, '{{"a{c}": 1}}'),
    "additionalProperties": (
        {"type": "object", "additionalProperties": {"type": "string", "maxLength": 4}},
        '{{"k": "a{c}"}}',
    ),
    "items": ({"type": "array", "items": {"type": "string", "maxLength": 3}}, '["a{c}"]'),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}, '"a{c}"'),
    "$defs": (
        {"$defs": {"s": {"type": "string", "maxLength": 3}}, "$ref": "#/$defs/s"},
        '"a{c}"',
    ),
    "untyped": ({}, '"a{c}"'),
}


@functools.cache
def compiler(tokenizer_path: str):
    from transformers import AutoTokenizer

    from jamba_ray.model.grammar import Compiler

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return Compiler(tokenizer_path, len(tok), tok.eos_token_id), tok.eos_token_id


def accepts(tokenizer_path: str, structured: StructuredOutputs, text: str | bytes) -> bool:
    """Whether the whole text is a complete sentence of the grammar (EOS may follow it)."""
    import xgrammar as xgr

    grammars, eos = compiler(tokenizer_path)
    m = xgr.GrammarMatcher(grammars.compile(structured))
    return m.accept_string(text) and m.accept_token(eos)


@pytest.mark.parametrize("path", STRING_PATHS)
def test_no_schema_path_lets_a_raw_control_character_into_a_string(tiny_ckpt, path):
    schema, doc = STRING_PATHS[path]
    s = StructuredOutputs(json=json.dumps(schema), tokenizer=tiny_ckpt)
    assert accepts(tiny_ckpt, s, doc.format(c="z"))
    for c in CONTROLS:
        assert not accepts(tiny_ckpt, s, doc.format(c=c)), (path, c)


def test_json_object_strings_refuse_raw_control_characters_and_take_escapes(tiny_ckpt):
    s = StructuredOutputs(json_object=True, tokenizer=tiny_ckpt)
    assert accepts(tiny_ckpt, s, '{"a": "x\\ty\\u0010"}')
    assert all(not accepts(tiny_ckpt, s, f'{{"a": "x{c}"}}') for c in CONTROLS)


def test_a_bounded_string_keeps_its_bounds(tiny_ckpt):
    schema = {"type": "string", "minLength": 1, "maxLength": 3}
    s = StructuredOutputs(json=json.dumps(schema), tokenizer=tiny_ckpt)
    verdicts = {t: accepts(tiny_ckpt, s, t) for t in ['""', '"a"', '"é漢字"', '"abcd"']}
    assert verdicts == {'""': False, '"a"': True, '"é漢字"': True, '"abcd"': False}
    assert not accepts(tiny_ckpt, s, b'"\xed\xa0\x80"')  # (an encoded surrogate: 3 U+FFFD)


def test_the_rewrite_reads_schema_keywords_only():
    from jamba_ray.engine.json_strings import strict_strings

    schema = {
        "type": "object",
        "properties": {"maxLength": {"type": "integer"}, "s": {"type": "string", "maxLength": 2}},
        "enum": [{"maxLength": 3}],
    }
    out = strict_strings(schema)
    assert out["properties"]["maxLength"] == {"type": "integer"} and out["enum"] == schema["enum"]
    pattern = '^[^\\x00-\\x1f"\\\\\\ud800-\\udfff]{0,2}$'
    assert out["properties"]["s"] == {"type": "string", "pattern": pattern}
    assert strict_strings({"type": "string", "maxLength": 2, "enum": ["a\tb"]})["maxLength"] == 2
