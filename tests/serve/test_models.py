"""The app's split: an ingress deployment in front of one engine deployment per model, reached
through a DeploymentHandle. The session's app shows the split; one more app serves two models
(two tiny checkpoints of different layouts, one in-process stage each), routed by the request's
`model` over HTTP and gRPC, listed, health-checked and measured together."""

from __future__ import annotations

import grpc
import pytest
import requests
from ray import serve

from jamba_ray.proto import jamba_pb2 as pb
from jamba_ray.serve.app import INGRESS, deployment, engine_name
from tests.serve.conftest import MODEL, grpc_stub, metric_totals, pipeline_for_tests, wait_for

APP = "two"
A, B = "model-a", "model-b"


def test_the_session_app_is_an_ingress_in_front_of_an_engine_deployment(served):
    deployments = serve.status().applications["jamba"].deployments
    assert set(deployments) == {INGRESS, engine_name(MODEL)}
    stats = served.stats()  # answered by the engine replica, through the ingress's handle
    assert stats["engine"]["deployment"] == engine_name(MODEL)
    assert stats["stages"] and stats["slots_total"] > 0


@pytest.fixture(scope="module")
def two(served, tiny_ckpt, tiny_ckpt_b):
    # One stage each, run in the engine replica itself (`backend: local`): the split and the
    # routing are under test here, stage actors are everywhere else; this keeps the app cheap.
    small = {"num_stages": 1, "backend": "local", "max_num_seqs": 4, "max_model_len": 256}
    configs = [
        pipeline_for_tests(**small, **{"serve.served_model_name": name}).to_config(path)
        for name, path in ((A, tiny_ckpt), (B, tiny_ckpt_b))
    ]
    serve.run(deployment(configs), name=APP, route_prefix=f"/{APP}", blocking=False)
    base = f"{served.base}/{APP}"
    try:
        wait_for(lambda: requests.get(f"{base}/health", timeout=60).ok, 180, what="two models")
        yield base
    finally:
        serve.delete(APP)


def generated(base: str) -> dict[str, int]:
    models = requests.get(f"{base}/v1/stats", timeout=30).json()["models"]
    return {name: s["generated_tokens"] for name, s in models.items()}


def test_two_models_in_one_app_are_routed_by_model(two, served):
    listed = requests.get(f"{two}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed] == [A, B]
    health = requests.get(f"{two}/health", timeout=60).json()
    assert health["status"] == "ok" and set(health["models"]) == {A, B}
    stats = requests.get(f"{two}/v1/stats", timeout=30).json()["models"]
    assert {n: s["engine"]["deployment"] for n, s in stats.items()} == {
        A: engine_name(A),
        B: engine_name(B),
    }

    before = generated(two)
    body = {"prompt": "route me", "max_tokens": 5, "ignore_eos": True, "temperature": 0}
    r = requests.post(f"{two}/v1/completions", json={**body, "model": B}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == B
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}
    r = requests.post(f"{two}/v1/chat/completions", json={**chat, "model": A}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == A
    after = generated(two)
    assert {n: after[n] - before[n] for n in after} == {A: 3, B: 5}

    r = requests.post(f"{two}/v1/completions", json={**body, "model": "c"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert "'model-a', 'model-b'" in r.json()["error"]["message"]

    text = requests.get(f"{two}/metrics", timeout=30).text
    assert text.splitlines().count("# TYPE jamba_ray_generated_tokens_total counter") == 1
    totals = metric_totals(text)
    for name in (A, B):
        assert totals[f'jamba_ray_generated_tokens_total{{model="{name}"}}'] == after[name]

    # gRPC: the `model` metadata entry picks the engine (none: the first model)
    channel, stub = grpc_stub(served)
    with channel:
        sampling = pb.SamplingOptions(max_tokens=4, ignore_eos=True)
        request = pb.GenerateRequest(text="route me", sampling=sampling)
        meta = (("application", APP), ("model", B))
        reply = stub.Generate(request, metadata=meta, timeout=60)
        assert len(reply.completions[0].token_ids) == 4
        reply = stub.Generate(request, metadata=(("application", APP),), timeout=60)
        assert len(reply.completions[0].token_ids) == 4
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request, metadata=(("application", APP), ("model", "c")), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            stub.Health(pb.HealthRequest(), metadata=(("application", APP), ("model", "c")))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.Health(pb.HealthRequest(), metadata=meta, timeout=60).status == "ok"
    done = generated(two)
    assert {n: done[n] - after[n] for n in done} == {A: 4, B: 4}
