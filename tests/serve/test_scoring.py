"""Prompt scoring and logprob bookkeeping through the real `openai` client: echo with max_tokens=0,
vLLM's prompt_logprobs, text offsets that index the text received (across stream chunks, with
echo), continuous usage stats, and request priority."""

from __future__ import annotations

import math

import grpc
import openai
import pytest

from jamba_ray.proto import jamba_pb2 as pb
from jamba_ray.proto import jamba_pb2_grpc as pb_grpc
from tests.serve.conftest import MODEL

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", timeout=120, max_retries=0)


def grpc_score(served, text: str) -> float:
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    req = pb.ScoreRequest(texts=[text])
    (res,) = (
        pb_grpc.JambaServiceStub(channel).Score(req, metadata=(("application", "jamba"),)).results
    )
    channel.close()
    return res.logprob


def test_echo_with_max_tokens_0_scores_the_prompt(client, served):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    (choice,) = r.choices
    lp = choice.logprobs
    assert choice.text == PROMPT and r.usage.completion_tokens == 0
    assert lp.tokens[0] == "<|startoftext|>" and lp.token_logprobs[0] is None
    assert len(lp.tokens) == r.usage.prompt_tokens and all(len(t) <= 3 for t in lp.top_logprobs[1:])
    assert math.isclose(sum(lp.token_logprobs[1:]), grpc_score(served, PROMPT), abs_tol=1e-3)
    # Offsets index `text`: BOS is not in it, so it takes no room.
    assert lp.text_offset[:2] == [0, 0]
    for token, at in zip(lp.tokens[1:], lp.text_offset[1:]):
        assert choice.text[at : at + len(token)] == token


def test_max_tokens_0_without_echo_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)


def test_echo_offsets_continue_into_the_completion(client):
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=0
    )
    lp, text = r.choices[0].logprobs, r.choices[0].text
    n_prompt = r.usage.prompt_tokens
    assert text.startswith(PROMPT) and lp.text_offset[n_prompt] == len(PROMPT)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(text)


def test_vllm_prompt_logprobs_on_completions_and_chat(client):
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": 3}
    )
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == r.usage.prompt_tokens
    for entry in plp[1:]:
        assert 3 <= len(entry) <= 4
        for item in entry.values():
            assert item["logprob"] <= 0 and item["decoded_token"] is not None
        assert sorted(i["rank"] for i in entry.values() if i["rank"]) == [1, 2, 3]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_body={"prompt_logprobs": 0},
    )
    plp = chat.model_extra["prompt_logprobs"]
    assert plp[0] is None and all(len(e) == 1 for e in plp[1:])


def test_streamed_text_offsets_run_on_across_chunks(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1)
    whole = client.completions.create(**kwargs).choices[0].logprobs.text_offset
    chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [
        o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert streamed == whole and len(streamed) == 12 and streamed[-1] > 0


def test_continuous_usage_stats_ride_on_every_chunk(client):
    usage_on = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body=usage_on,
        )
    )
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and all(c.usage for c in chunks)
    assert chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    chat = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            extra_body={"ignore_eos": True, **usage_on},
        )
    )
    assert all(c.usage is not None for c in chat[1:]) and chat[-1].usage.completion_tokens == 3


def test_priority_is_accepted_everywhere(client):
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"priority": -10}
    )
    c = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        extra_body={"priority": 5},
    )
    assert r.choices and c.choices
