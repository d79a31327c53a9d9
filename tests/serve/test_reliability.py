"""Under load, cancellations, fuzzed input and a soak, the server keeps working, leaking nothing."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from benchmarks.soak import run_soak
from jamba_ray.serve.app import deployment
from tests.serve.conftest import MODEL, pipeline_for_tests, wait_for


def test_two_hundred_streams_cancelled_at_random_points_leak_no_slot(served):
    rng = random.Random(0)
    cut_points = [rng.randint(1, 12) for _ in range(200)]

    def one(cut: int) -> int:
        body = {
            "model": MODEL,
            "prompt": "cancel me",
            "max_tokens": 64,
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
    assert set(codes) <= {200, 429} and codes.count(200) > 100
    served.wait_idle(timeout=120)


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
    report = run_soak(served.base, MODEL, clients=8, seconds=30)
    assert not report.unexpected, report.unexpected[:5]
    assert sum(report.outcomes.values()) > 20
    assert report.slots_in_use_end == 0


@pytest.fixture(scope="module")
def secured(served, tiny_ckpt):
    os.environ["JAMBA_TEST_API_KEY"] = "s3cret"
    pipeline = pipeline_for_tests(**{"stages": 1, "serve.api_key_env": "JAMBA_TEST_API_KEY"})
    serve.run(
        deployment(pipeline.to_config(tiny_ckpt)),
        name="secured",
        route_prefix="/secured",
        blocking=False,
    )
    base = f"{served.base}/secured"
    wait_for(lambda: requests.get(f"{base}/health", timeout=60).ok, 180, what="secured app")
    yield base
    serve.delete("secured")


def test_api_key_is_enforced(secured):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    r = requests.post(f"{secured}/v1/completions", json=body, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = requests.post(
        f"{secured}/v1/completions",
        json=body,
        timeout=60,
        headers={"Authorization": "Bearer wrong"},
    )
    assert r.status_code == 401
    r = requests.post(
        f"{secured}/v1/completions",
        json=body,
        timeout=60,
        headers={"Authorization": "Bearer s3cret"},
    )
    assert r.status_code == 200 and r.json()["choices"]
    assert requests.get(f"{secured}/v1/models", timeout=60).status_code == 401


def test_api_key_is_enforced_on_grpc_too(secured, served):
    import grpc

    from jamba_ray.proto import jamba_pb2 as pb
    from jamba_ray.proto import jamba_pb2_grpc as pb_grpc

    req = pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=2))
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as ch:
        stub = pb_grpc.JambaServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, metadata=(("application", "secured"),), timeout=60)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Generate(
            req,
            metadata=(("application", "secured"), ("authorization", "Bearer s3cret")),
            timeout=60,
        )
        assert ok.completions


def test_the_request_that_starts_the_engine_can_disconnect_without_stalling_it(served, tiny_ckpt):
    """The step loop serves every request: the client whose request started it may leave at once.
    (The soak once caught stage tasks being cancelled with such a request; this test shows the
    behaviour, the soak is what reproduced the bug.)"""
    pipeline = pipeline_for_tests(**{"stages": 2})
    serve.run(
        deployment(pipeline.to_config(tiny_ckpt)),
        name="fresh",
        route_prefix="/fresh",
        blocking=False,
    )
    base = f"{served.base}/fresh"
    wait_for(lambda: requests.get(f"{base}/v1/models", timeout=60).ok, 180, what="fresh app")
    body = {
        "model": MODEL,
        "prompt": "first",
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        for _ in range(3):  # the first of these starts the engine loop, then each client leaves
            with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=60) as r:
                next(line for line in r.iter_lines() if line)
        for _ in range(5):
            r = requests.post(
                f"{base}/v1/completions",
                timeout=60,
                json={"model": MODEL, "prompt": "after", "max_tokens": 8},
            )
            assert r.status_code == 200, r.text
        stats = wait_for(
            lambda: (
                (s := requests.get(f"{base}/v1/stats", timeout=30).json())["slots_in_use"] == 0
                and s
            ),
            60,
            what="slots freed",
        )
        assert stats["stage_restarts"] == 0
    finally:
        serve.delete("fresh")


def test_when_a_stage_dies_and_cannot_be_replaced_clients_get_503_not_a_hang(served, tiny_ckpt):
    import signal

    import grpc

    from jamba_ray.proto import jamba_pb2 as pb
    from jamba_ray.proto import jamba_pb2_grpc as pb_grpc

    pipeline = pipeline_for_tests(**{"stages": 2, "max_stage_restarts": 0})
    serve.run(
        deployment(pipeline.to_config(tiny_ckpt)),
        name="fragile",
        route_prefix="/fragile",
        blocking=False,
    )
    base = f"{served.base}/fragile"
    wait_for(lambda: requests.get(f"{base}/health", timeout=60).ok, 180, what="fragile app")
    try:
        os.kill(
            requests.get(f"{base}/v1/stats", timeout=30).json()["stages"][1]["pid"], signal.SIGKILL
        )
        r = requests.post(
            f"{base}/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 4},
            timeout=120,
        )
        assert (
            r.status_code == 503
            and r.headers["Retry-After"]
            and "replaced" in r.json()["error"]["message"]
        )
        assert requests.get(f"{base}/health", timeout=120).status_code == 503
        with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.JambaServiceStub(ch).Generate(
                    pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(max_tokens=2)),
                    metadata=(("application", "fragile"),),
                    timeout=120,
                )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        serve.delete("fragile")
