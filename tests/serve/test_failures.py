"""Failure paths end to end on real Serve: a stage dying mid-stream, requests outliving the
server's timeout, and an app in bf16 with int8 weights (each app deployed beside the session's)."""

from __future__ import annotations

import json
import os

import grpc
import pytest
import requests
from ray import serve

from jamba_ray.proto import jamba_pb2 as pb
from tests.conftest import hf_model
from tests.serve.conftest import MODEL, app_stats, deploy, grpc_stub, sse_events, wait_app_idle


def test_when_a_stage_dies_and_cannot_be_replaced_clients_get_503_not_a_hang(served, tiny_ckpt):
    """Streams in flight end with an error event (HTTP) or status (gRPC), never a dropped
    connection or a hang; requests after it get 503 / UNAVAILABLE at once."""
    import signal

    base = deploy(
        served, tiny_ckpt, "fragile", num_stages=2, max_stage_restarts=0, max_model_len=2048
    )
    long = {"model": MODEL, "prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    long_grpc = pb.GenerateRequest(
        text="x", sampling=pb.SamplingOptions(max_tokens=2000, ignore_eos=True)
    )
    app = (("application", "fragile"),)
    channel, stub = grpc_stub(served)
    try:
        with requests.post(f"{base}/v1/completions", json=long, stream=True, timeout=120) as r:
            lines = (ln.decode() for ln in r.iter_lines() if ln)
            next(lines)  # both streams have begun
            call = stub.GenerateStream(long_grpc, metadata=app, timeout=120)
            next(call)
            os.kill(app_stats(base)["stages"][1]["pid"], signal.SIGKILL)
            rest = list(lines)
        error = json.loads(rest[-2][len("data: ") :])["error"]
        assert rest[-1] == "data: [DONE]"
        assert error["code"] == 503 and error["type"] == "service_unavailable"
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
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
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(
                pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(max_tokens=2)),
                metadata=app,
                timeout=120,
            )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        serve.delete("fragile")


# ---- an app in bf16 with int8 weights, and a 4 s request timeout ---------------------------------
STRICT = (("application", "strict"),)
TIMEOUT_S = 2
FOREVER = dict(n=4, max_tokens=2000)  # 2000 steps of 4 rows: 20 s or more here, 10x the timeout
TEXTS = [
    "hello world, the quick brown fox",
    "Ray starts the stage actors inside a placement group.",
]


@pytest.fixture(scope="module")
def strict(served, tiny_ckpt):
    overrides = {"dtype": "bfloat16", "quantization": "int8", "max_model_len": 2048}
    base = deploy(
        served, tiny_ckpt, "strict", **overrides, **{"serve.request_timeout_s": TIMEOUT_S}
    )
    yield base
    serve.delete("strict")


def test_bf16_serving_with_int8_weights_scores_like_transformers(strict, served, tiny_ckpt):
    import torch

    channel, stub = grpc_stub(served)
    with channel:
        req = pb.ScoreRequest(texts=TEXTS, return_token_logprobs=True)
        res = stub.Score(req, metadata=STRICT, timeout=120)
    diffs = []
    for r in res.results:
        ids = list(r.token_ids)
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(tiny_ckpt)(torch.tensor([ids])).logits[0], -1)
        diffs += [
            abs(lp - float(logp[i, t])) for i, (t, lp) in enumerate(zip(ids[1:], r.token_logprobs))
        ]
    # vs fp32: bf16 rounding moves a token's log-probability by ~0.03, and an MoE routing choice
    # that flips on rounding moves one token by up to ~1; a wrong model is off by nats throughout
    assert len(diffs) == sum(len(r.token_ids) - 1 for r in res.results) > 20
    assert max(diffs) < 1.0 and sum(diffs) / len(diffs) < 0.15
    # bf16 halves every weight and int8 halves the linear ones again: under half the fp32 bytes
    weights = [
        sum(s["param_bytes"] for s in st["stages"]) for st in (app_stats(strict), served.stats())
    ]
    assert weights[0] < weights[1] / 2


def aborted_by_the_timeout(base: str, call) -> None:
    """`call` asks for FOREVER and meets the timeout; its request ends well short of its length,
    and gives back its KV blocks (only the checkpoints hold some once idle)."""
    before = wait_app_idle(base)
    call()
    after = wait_app_idle(base)
    assert after["finished_requests"] - before["finished_requests"] == 1
    assert after["generated_tokens"] - before["generated_tokens"] < FOREVER["n"] * 2000 / 2
    assert after["kv_blocks_in_use"] == after["kv_blocks_held_by_checkpoints"], after


def test_requests_that_outlive_the_timeout_get_504_on_every_front_and_end(strict, served):
    body = {"model": MODEL, "prompt": "on and on", "ignore_eos": True, **FOREVER}

    def unary():
        r = requests.post(f"{strict}/v1/completions", json=body, timeout=120)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"

    def streaming():  # the deadline holds while events flow, not only between them
        stream = {**body, "stream": True}
        with requests.post(f"{strict}/v1/completions", json=stream, stream=True, timeout=120) as r:
            events = sse_events(r)
        error = json.loads(events[-2])["error"]
        assert r.status_code == 200 and len(events) > 2 and events[-1] == "[DONE]"
        assert error["code"] == 504 and error["type"] == "timeout"

    req = pb.GenerateRequest(
        text="on and on", sampling=pb.SamplingOptions(ignore_eos=True, **FOREVER)
    )
    channel, stub = grpc_stub(served)

    def grpc_unary():  # the client would wait 120 s: this deadline is the server's
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, metadata=STRICT, timeout=120)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"{TIMEOUT_S}s timeout" in e.value.details()

    def grpc_streaming():
        parts = []
        with pytest.raises(grpc.RpcError) as e:
            for part in stub.GenerateStream(req, metadata=STRICT, timeout=120):
                parts.append(part)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and parts
        assert f"{TIMEOUT_S}s timeout" in e.value.details()

    with channel:
        for call in (unary, streaming, grpc_unary, grpc_streaming):
            aborted_by_the_timeout(strict, call)
