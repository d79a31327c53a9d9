"""Request fields at the edge, through the real `openai` client and grpcio: every 400 about one
field names it in `param`; max_completion_tokens=0 and stream_options without a stream are refused;
cache_salt reaches SamplingParams from completions, chat and gRPC."""

from __future__ import annotations

import grpc
import openai
import pytest

from jamba_ray.proto import jamba_pb2 as pb
from tests.serve.conftest import MODEL, grpc_stub

ASK = [{"role": "user", "content": "hi"}]
LONG = "word " * 400  # more than the test server's 300 prompt tokens
IMAGE = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", timeout=120, max_retries=0)


CHAT = [
    ({"n": 0}, "n"),
    ({"n": 100}, "n"),  # more than the server's state slots
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),  # past the server's max_tokens_limit
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ({"messages": [{"role": "user", "content": IMAGE}]}, "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"cache_salt": ""}}, "cache_salt"),
]


@pytest.mark.parametrize("fields, param", CHAT, ids=[f"{p}:{f}" for f, p in CHAT])
def test_a_chat_400_names_its_field(client, fields, param):
    kwargs = {"model": MODEL, "messages": ASK, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs)
    assert e.value.param == param, e.value.message


COMPLETIONS = [
    ({"n": 0}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"logprobs": 50}, "logprobs"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"prompt": LONG}, "prompt"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"cache_salt": ""}}, "cache_salt"),
]


@pytest.mark.parametrize("fields, param", COMPLETIONS, ids=[f"{p}:{f}" for f, p in COMPLETIONS])
def test_a_completions_400_names_its_field(client, fields, param):
    kwargs = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kwargs)
    assert e.value.param == param, e.value.message


def test_max_completion_tokens_caps_the_reply_and_wins_over_max_tokens(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=50,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_a_cache_salt_is_accepted_on_completions_and_chat(client):
    salt = {"cache_salt": "tenant-a"}
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=salt)
    assert r.choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, extra_body=salt)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_grpc_takes_a_cache_salt_and_refuses_an_empty_one(served):
    channel, stub = grpc_stub(served)
    meta = (("application", "jamba"),)

    def generate(salt: str):
        sampling = pb.SamplingOptions(max_tokens=2, temperature=0, cache_salt=salt)
        return stub.Generate(pb.GenerateRequest(text="hi", sampling=sampling), metadata=meta,
                             timeout=120)  # fmt: skip

    assert generate("tenant-a").completions[0].finish_reason in ("stop", "length")
    with pytest.raises(grpc.RpcError) as e:
        generate("")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_salt" in e.value.details()
    channel.close()
