"""Under load, cancellations, fuzzed input and a soak, the server keeps working, leaking nothing."""

from __future__ import annotations

import concurrent.futures as cf
import json
import random

import grpc
import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from benchmarks.soak import run_soak
from jamba_ray.proto import jamba_pb2 as pb
from tests.serve.conftest import MODEL, deploy, grpc_stub, wait_for


def test_two_hundred_streams_cancelled_at_random_points_leak_no_slot(served):
    """Every stream ignores EOS and asks for 400 tokens, and is left after 1 to 12 events: only
    the aborts free the slots, and a request that ran on would add its whole 400 tokens."""
    rng = random.Random(0)
    cut_points = [rng.randint(1, 12) for _ in range(200)]
    before = served.wait_idle()

    def one(cut: int) -> int:
        body = {
            "model": MODEL,
            "prompt": "cancel me",
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        }
        with requests.post(
            f"{served.base}/v1/completions", json=body, stream=True, timeout=120
        ) as r:
            if r.status_code != 200:
                return r.status_code
            for i, _ in enumerate(line for line in r.iter_lines() if line):
                if i + 1 >= cut:
                    break
            return 200

    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, cut_points))
    ok = codes.count(200)
    assert set(codes) <= {200, 429} and ok > 100
    after = served.wait_idle(timeout=120)
    assert after["finished_requests"] - before["finished_requests"] == ok
    assert after["generated_tokens"] - before["generated_tokens"] < ok * 400 / 2


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=8,
)
FIELDS = [
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "logprobs",
    "echo",
    "stream",
    "presence_penalty",
    "frequency_penalty",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "ignore_eos",
    "messages",
    "logit_bias",
    "best_of",
]
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8).map(
    lambda d: {**d, "model": d.get("model", MODEL)}
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(body=BODIES, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_requests_never_get_a_5xx(served, body, path):
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)  # keep valid requests short
    body["stream"] = False
    r = requests.post(
        served.base + path,
        data=json.dumps(body),
        timeout=120,
        headers={"content-type": "application/json"},
    )
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert "error" in r.json() and "Traceback" not in r.text


def test_server_is_healthy_after_the_fuzzing(served):
    assert requests.get(f"{served.base}/health", timeout=60).json()["status"] == "ok"
    served.wait_idle(timeout=120)


def test_short_soak_has_no_unexpected_errors_and_no_leaked_slots(served):
    report = run_soak(served.base, MODEL, clients=8, seconds=10)
    assert not report.unexpected, report.unexpected[:5]
    assert sum(report.outcomes.values()) > 20
    assert report.slots_in_use_end == 0


KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def secured(served, tiny_ckpt):
    with pytest.MonkeyPatch.context() as env:  # the key travels to the replica in its runtime env
        env.setenv("JAMBA_TEST_API_KEY", "s3cret")
        base = deploy(
            served,
            tiny_ckpt,
            "secured",
            num_stages=1,
            **{"serve.api_key_env": "JAMBA_TEST_API_KEY"},
        )
    yield base
    serve.delete("secured")


def test_the_request_that_starts_the_engine_can_disconnect_without_stalling_it(secured):
    """The step loop serves every request: the client whose request started it may leave at once.
    (The soak once caught stage tasks being cancelled with such a request; this test shows the
    behaviour, the soak is what reproduced the bug.) The first test on its app: no request has
    started that engine's loop yet."""
    fresh = requests.get(f"{secured}/v1/stats", timeout=30, headers=KEY).json()
    assert fresh["finished_requests"] == 0 and fresh["generated_tokens"] == 0
    body = {
        "model": MODEL,
        "prompt": "first",
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    for _ in range(3):  # the first of these starts the engine loop, then each client leaves
        with requests.post(
            f"{secured}/v1/completions", json=body, stream=True, timeout=60, headers=KEY
        ) as r:
            next(line for line in r.iter_lines() if line)
    for _ in range(5):
        r = requests.post(
            f"{secured}/v1/completions",
            timeout=60,
            headers=KEY,
            json={"model": MODEL, "prompt": "after", "max_tokens": 8},
        )
        assert r.status_code == 200, r.text
    stats = wait_for(
        lambda: (
            (s := requests.get(f"{secured}/v1/stats", timeout=30, headers=KEY).json())[
                "slots_in_use"
            ]
            == 0
            and s
        ),
        60,
        what="slots freed",
    )
    assert stats["stage_restarts"] == 0


def test_api_key_is_enforced(secured):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, json_body in [("/v1/completions", body), ("/v1/chat/completions", chat)]:
        r = requests.post(f"{secured}{path}", json=json_body, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        wrong = {"Authorization": "Bearer wrong"}
        r = requests.post(f"{secured}{path}", json=json_body, timeout=60, headers=wrong)
        assert r.status_code == 401
        r = requests.post(f"{secured}{path}", json=json_body, timeout=60, headers=KEY)
        assert r.status_code == 200 and r.json()["choices"]
    for path in ("/v1/models", "/v1/stats"):  # stats name stage pids: behind the key as well
        assert requests.get(f"{secured}{path}", timeout=60).status_code == 401
        assert requests.get(f"{secured}{path}", timeout=60, headers=KEY).status_code == 200
    for path in ("/health", "/metrics"):  # open, as vLLM's are: probes and scrapers hold no key
        assert requests.get(f"{secured}{path}", timeout=60).status_code == 200


def test_the_openai_client_with_and_without_the_key(secured):
    def client(key):
        return openai.OpenAI(base_url=f"{secured}/v1", api_key=key, timeout=60, max_retries=0)

    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        client("wrong").chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    r = client("s3cret").chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert r.choices[0].message.role == "assistant"


def test_api_key_is_enforced_on_grpc_too(secured, served):
    gen = pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=2))
    score = pb.ScoreRequest(texts=["hello world"])
    app = ("application", "secured")
    channel, stub = grpc_stub(served)
    with channel:
        calls = [
            lambda meta: stub.Generate(gen, metadata=meta, timeout=60).completions,
            lambda meta: list(stub.GenerateStream(gen, metadata=meta, timeout=60))[-1].finished,
            lambda meta: stub.Score(score, metadata=meta, timeout=60).results,
        ]
        for call in calls:
            for meta in [(app,), (app, ("authorization", "Bearer wrong"))]:
                with pytest.raises(grpc.RpcError) as e:
                    call(meta)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert call((app, ("authorization", "Bearer s3cret")))
        assert stub.Health(pb.HealthRequest(), metadata=(app,), timeout=60).status == "ok"
