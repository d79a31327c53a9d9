"""Structured outputs over HTTP (the real `openai` client) and gRPC: the random tiny model answers
with JSON that validates, text that matches, one of the choices; streamed or not."""

from __future__ import annotations

import json
import re
from typing import Literal

import grpc
import jsonschema
import openai
import pydantic
import pytest
import requests

from jamba_ray.proto import jamba_pb2 as pb
from jamba_ray.proto import jamba_pb2_grpc as pb_grpc
from tests.serve.conftest import MODEL

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "who is it?"}]
LONG = 300  # room enough for the grammar to close: finish_reason is then "stop"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", timeout=120, max_retries=0)


def json_schema_format(schema: dict) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_json_schema_reply_validates(client, temperature):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=LONG,
        temperature=temperature,
        seed=3,
        n=2,
        response_format=json_schema_format(PERSON),
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_streamed_chat_json_schema_reply_validates(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=LONG,
        temperature=0,
        stream=True,
        response_format=json_schema_format(PERSON),
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_replies_are_objects(client):
    """Free-form objects: a random model may write a string until max_tokens; any reply that
    ended by itself is an object."""
    stopped = 0
    for prompt in ["hello", "The quick brown fox", "{"]:
        r = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=LONG,
            temperature=0,
            extra_body={"response_format": {"type": "json_object"}},
        )
        if r.choices[0].finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(r.choices[0].text), dict)
    assert stopped


def test_parse_into_a_pydantic_model(client):
    class Person(pydantic.BaseModel):
        name: Literal["ann", "bob"]
        ok: bool

    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, max_tokens=LONG, temperature=0, response_format=Person
    )
    assert isinstance(r.choices[0].message.parsed, Person)


def test_completions_take_vllm_guided_fields(client):
    cases = [
        ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ({"guided_json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        ({"guided_grammar": 'root ::= "x" [0-9] [0-9]'}, lambda t: re.fullmatch(r"x[0-9]{2}", t)),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        (
            {"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}},
            lambda t: json.dumps(json.loads(t)) == t,  # compact: no free whitespace
        ),
    ]
    for extra, holds in cases:
        r = client.completions.create(
            model=MODEL,
            prompt="answer:",
            max_tokens=LONG,
            temperature=1.0,
            seed=1,
            extra_body=extra,
        )
        text = r.choices[0].text
        assert r.choices[0].finish_reason == "stop" and holds(text), (extra, text)


def test_streamed_completion_follows_the_regex(client):
    stream = client.completions.create(
        model=MODEL,
        prompt="code:",
        max_tokens=40,
        temperature=1.0,
        stream=True,
        extra_body={"guided_regex": r"[A-Z]{2}[0-9]{4}"},
    )
    assert re.fullmatch(
        r"[A-Z]{2}[0-9]{4}", "".join(c.choices[0].text for c in stream if c.choices)
    )


BAD = [
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "one structured-output constraint"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "whitespace_pattern"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"guided_regex": "a+", "ignore_eos": True}, "ignore_eos"),
]


@pytest.mark.parametrize("extra, words", BAD, ids=[w for _, w in BAD])
def test_a_bad_constraint_is_a_400_naming_it(served, extra, words):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4, **extra}
    r = requests.post(f"{served.base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_grpc_generate_and_stream_follow_the_schema(served):
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    stub = pb_grpc.JambaServiceStub(channel)
    meta = (("application", "jamba"),)
    so = pb.StructuredOutput(json_schema=json.dumps(PERSON))
    req = pb.GenerateRequest(
        text="who?",
        sampling=pb.SamplingOptions(max_tokens=LONG, temperature=0, structured=so, priority=-1),
    )
    unary = stub.Generate(req, metadata=meta, timeout=120).completions[0]
    jsonschema.validate(json.loads(unary.text), PERSON)
    parts = list(stub.GenerateStream(req, metadata=meta, timeout=120))
    assert "".join(d.text for p in parts for d in p.deltas) == unary.text
    choice = pb.StructuredOutput(choice=pb.Choices(values=["left", "right"]))
    req = pb.GenerateRequest(
        text="go", sampling=pb.SamplingOptions(max_tokens=10, temperature=1, structured=choice)
    )
    assert stub.Generate(req, metadata=meta, timeout=120).completions[0].text in ("left", "right")
    bad = pb.GenerateRequest(
        text="x", sampling=pb.SamplingOptions(structured=pb.StructuredOutput(regex="[a-"))
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(bad, metadata=meta, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regex" in e.value.details()
    channel.close()


# ---- strict JSON over many seeds -------------------------------------------------------------
# Length-bounded strings are where xgrammar let raw control characters through.
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 5}},
        "meta": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 4}},
    },
    "required": ["name", "tags", "meta"],
    "additionalProperties": False,
}
SEEDS = range(3)  # x n=8 samples each: 24 replies per format


def raw_controls(text: str) -> list[str]:
    """Raw U+0000-U+001F inside JSON strings (RFC 8259 forbids them; escapes are fine)."""
    found, inside, escaped = [], False, False
    for ch in text:
        if inside and not escaped and ch == "\\":
            escaped = True
            continue
        if ch == '"' and not escaped:
            inside = not inside
        elif inside and ord(ch) < 0x20:
            found.append(ch)
        escaped = False
    return found


def strict_replies(client, response_format: dict, schema: dict) -> int:
    """Every reply holds no raw control character in a string; every one that ended by itself
    parses with json.loads and validates. Returns how many ended by themselves."""
    stopped = 0
    for seed in SEEDS:
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=LONG, temperature=1.0, seed=seed, n=8,
            response_format=response_format,
        )  # fmt: skip
        for c in r.choices:
            text = c.message.content
            assert not raw_controls(text), (seed, text)
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(text), schema)
                stopped += 1
    return stopped


def test_json_schema_replies_are_strict_json_over_many_seeds(client):
    assert strict_replies(client, json_schema_format(BOUNDED), BOUNDED) >= 12


def test_json_object_replies_are_strict_json_over_many_seeds(client):
    strict_replies(client, {"type": "json_object"}, {"type": "object"})
