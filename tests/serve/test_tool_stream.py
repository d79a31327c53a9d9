"""Tool-call deltas of a forced call go out as the call is generated, name first and then
fragments of its arguments, and join into exactly the call the unstreamed reply gives; a call cut
short keeps what was generated. Pure: no server."""

from __future__ import annotations

import json

from jamba_ray.serve.tool_stream import ToolStream
from jamba_ray.serve.tools import parse

CALLS = (
    '[{"name": "get_weather", "arguments": {"city": "Pa\\"ris", "n": [1, {"name": "x"}]}}, '
    '{"name": "get_time", "arguments": {}}]'
)
REPLY = f"<tool_calls>{CALLS}</tool_calls>"


def stream(reply: str, step: int, incremental: bool = True) -> tuple[str, list[dict]]:
    s, text, deltas = ToolStream(incremental), "", []
    for i in range(0, len(reply), step):
        more, found = s.push(reply[i : i + step])
        text, deltas = text + more, deltas + found
    more, found = s.finish()
    return text + more, deltas + found


def joined(deltas: list[dict]) -> dict[int, dict]:
    """What a client makes of the deltas: per index, the name and the arguments joined."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"name": None, "arguments": ""})
        assert call["name"] is not None or "name" in d["function"]  # the name comes first
        call["name"] = d["function"].get("name", call["name"])
        call["arguments"] += d["function"]["arguments"]
    return calls


def test_streamed_deltas_join_into_the_unstreamed_calls_in_any_pieces():
    _, whole = parse(REPLY)
    expected = {c["index"]: {k: c["function"][k] for k in ("name", "arguments")} for c in whole}
    assert json.loads(expected[0]["arguments"]) == {"city": 'Pa"ris', "n": [1, {"name": "x"}]}
    for step in (1, 2, 3, 7, 13, len(REPLY)):
        text, deltas = stream(REPLY, step)
        assert text == "" and joined(deltas) == expected
        heads = [d for d in deltas if "name" in d["function"]]
        assert [(d["index"], d["type"]) for d in heads] == [(0, "function"), (1, "function")]
        assert all(d["id"].startswith("call_") for d in heads)


def test_deltas_go_out_before_the_end_tag():
    s = ToolStream(incremental=True)
    _, early = s.push(REPLY[: REPLY.index('"n"')])
    assert [d["function"] for d in early] == [
        {"name": "get_weather", "arguments": ""},
        {"arguments": '{"city": "Pa\\"ris", '},
    ]


def test_a_call_cut_short_keeps_its_name_and_the_arguments_so_far():
    cut = REPLY[: REPLY.index("1, {")]
    so_far = '{"city": "Pa\\"ris", "n": ['
    _, deltas = stream(cut, step=5)
    content, calls = parse(cut, partial=True)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert calls[0]["function"]["arguments"] == so_far
    assert joined(deltas) == {0: {"name": "get_weather", "arguments": so_far}}
    assert parse(cut) == (cut, [])  # (not forced: an unclosed block is content)
    assert parse("<tool_calls>[{", partial=True) == ("<tool_calls>[{", [])  # nothing named yet


def test_auto_sends_a_block_whole_once_it_closes_or_as_content():
    text, deltas = stream("Hi " + REPLY, step=3, incremental=False)
    assert text == "Hi " and [d["function"]["name"] for d in deltas] == ["get_weather", "get_time"]
    bad = "Hi <tool_calls>[oops]</tool_calls> there"
    assert stream(bad, step=4, incremental=False) == (bad, [])
