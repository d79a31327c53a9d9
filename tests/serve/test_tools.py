"""Tool calling in Jamba's format (`<tool_calls>[{"name", "arguments"}]</tool_calls>`), through
the real `openai` client: forced choices always give well-formed calls, streamed or not, and the
history's calls and results reach the chat template."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests

from jamba_ray.serve.tool_stream import ToolStream
from jamba_ray.serve.tools import parse
from tests.serve.conftest import MODEL

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Tokyo"]}, "days": {"enum": [1, 2]}},
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]
ASK = [{"role": "user", "content": "weather in Paris?"}]
LONG = 200  # (the tools' JSON takes room in the 512-token context)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", timeout=120, max_retries=0)


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            jsonschema.validate(args, WEATHER)
        else:
            assert call.function.name == "get_time" and args == {}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_always_gives_well_formed_calls(client, temperature):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=LONG,
        temperature=temperature,
        seed=2,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls)


def test_a_named_function_is_the_one_called_once(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=True,
        max_tokens=LONG,
        temperature=1.0,
        seed=4,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "stop"
    check_calls([call])


def test_streamed_calls_come_as_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=LONG,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].function.name and deltas[0].id
    assert deltas[0].function.arguments == "" and len(deltas) >= 2  # name first, then fragments
    assert {d.index for d in deltas} == {0} and all(d.id is None for d in deltas[1:])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    args = json.loads("".join(d.function.arguments or "" for d in deltas))
    if deltas[0].function.name == "get_weather":
        jsonschema.validate(args, WEATHER)
    else:
        assert deltas[0].function.name == "get_time" and args == {}


def test_auto_and_none_leave_a_plain_reply_as_content(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=8, temperature=0
        )
        assert r.choices[0].message.tool_calls is None
        assert r.choices[0].message.content is not None


def test_history_calls_and_results_reach_the_template(served, client):
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "days": 1}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = {"model": MODEL, "messages": history, "tools": TOOLS[1:]}  # (short: fits the limit)
    ids = requests.post(f"{served.base}/tokenize", json=body, timeout=60).json()["tokens"]
    text = requests.post(f"{served.base}/detokenize", json={"tokens": ids}, timeout=60).json()
    prompt = text["prompt"]
    assert (
        '<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}]' in prompt
    )
    assert "<|tool|>sunny" in prompt and '"name": "get_time"' in prompt
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS[1:], max_tokens=4)
    assert r.choices[0].message.role == "assistant"


BAD = [
    ({"tool_choice": "required"}, "tool_choice requires tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, "unknown"),
    ({"tools": TOOLS + TOOLS[:1]}, "unique"),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "forced",
    ),
    ({"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("extra, words", BAD, ids=[w for _, w in BAD])
def test_bad_tool_requests_are_400s(served, extra, words):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    r = requests.post(f"{served.base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_the_parser_reads_jamba_calls_whole_or_streamed_in_any_pieces():
    calls_json = '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]'
    reply = f"Let me look. <tool_calls>{calls_json}</tool_calls>"
    content, calls = parse(reply)
    assert content == "Let me look. "
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f", '{"a": 1}'),
        ("g", "{}"),
    ]
    for step in (1, 2, 5, 13, len(reply)):
        stream, text, streamed = ToolStream(), "", []
        for i in range(0, len(reply), step):
            more, found = stream.push(reply[i : i + step])
            text, streamed = text + more, streamed + found
        more, found = stream.finish()
        text, streamed = text + more, streamed + found
        assert text == content and [c["index"] for c in streamed] == [0, 1]
        assert [c["function"] for c in streamed] == [c["function"] for c in calls]
    assert parse("a <tool_calls>[not json") == ("a <tool_calls>[not json", [])
    assert ToolStream().push("x <tool") == ("x ", [])


# ---- forced calls: bounded, always parsed, streamed as generated --------------------------------
CITY = {"type": "string", "maxLength": 12}  # (bounded strings: where raw controls got through)
BOUNDED = {
    "type": "object",
    "properties": {"city": CITY, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
BOUNDED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": BOUNDED}},
    {"type": "function", "function": {"name": "get_time"}},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
ROOM = 150  # more than the longest call the bounded schemas allow (~100 tokens)


def strict_args(call) -> dict:
    """json.loads is strict: a raw control character in a string fails it. The text is the
    template's own form: no free whitespace, ", " and ": " between items."""
    args = json.loads(call.function.arguments)
    assert call.function.arguments == json.dumps(args, ensure_ascii=False)
    jsonschema.validate(args, BOUNDED if call.function.name == "get_weather" else {"const": {}})
    return args


@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
def test_a_forced_call_always_parses_into_strict_json_over_many_seeds(client, choice):
    for seed in range(3):  # x n=8: 24 replies
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=BOUNDED_TOOLS, tool_choice=choice, n=8,
            parallel_tool_calls=False, max_tokens=ROOM, temperature=1.0, seed=seed,
        )  # fmt: skip
        for c in r.choices:
            assert c.finish_reason == ("tool_calls" if choice == "required" else "stop")
            assert c.message.content is None and len(c.message.tool_calls) == 1, c.message
            strict_args(c.message.tool_calls[0])


def test_auto_calls_that_parse_are_strict_json(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=BOUNDED_TOOLS, tool_choice="auto", n=8, max_tokens=60,
        temperature=1.0, seed=1,
    )  # fmt: skip
    for c in r.choices:
        for call in c.message.tool_calls or []:
            assert isinstance(json.loads(call.function.arguments), dict)


def joined_deltas(stream) -> tuple[dict[int, dict], list[str]]:
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:  # the first delta of a call carries its id and name
                    assert d.id and d.function.name, d
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
    return calls, [r for r in reasons if r]


CASES = [("required", ROOM), (NAMED, 40)]


@pytest.mark.parametrize("choice, max_tokens", CASES, ids=["whole", "cut short"])
def test_streamed_call_deltas_join_into_the_unstreamed_call(client, choice, max_tokens):
    """40 tokens end inside the arguments: the reply says "length", and both forms hold the
    call's name and its arguments as far as they came (incomplete JSON)."""
    kwargs = dict(
        model=MODEL, messages=ASK, tools=BOUNDED_TOOLS, tool_choice=choice,
        max_tokens=max_tokens, temperature=1.0, seed=7,
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0]
    streamed, reasons = joined_deltas(client.chat.completions.create(**kwargs, stream=True))
    calls = {i: {"name": c.function.name, "arguments": c.function.arguments}
             for i, c in enumerate(whole.message.tool_calls)}  # fmt: skip
    assert streamed == calls and reasons == [whole.finish_reason]
    if max_tokens == ROOM:
        assert whole.finish_reason == "tool_calls" and all(
            strict_args(c) is not None for c in whole.message.tool_calls
        )
    else:
        assert whole.finish_reason == "length" and calls[0]["name"] == "get_weather"
        assert calls[0]["arguments"].startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(calls[0]["arguments"])
