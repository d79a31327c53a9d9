"""The gRPC API through Serve's gRPC proxy, with a real grpcio client, beside the HTTP API."""

from __future__ import annotations

import concurrent.futures as cf

import grpc
import pytest
import requests
import torch

from jamba_ray import LLM, SamplingParams
from jamba_ray.proto import jamba_pb2 as pb
from jamba_ray.proto import jamba_pb2_grpc as pb_grpc
from tests.conftest import STAGE_CPUS, hf_model
from tests.serve.conftest import MODEL

META = (("application", "jamba"),)


def hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def stub(served):
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=60)
    yield pb_grpc.JambaServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def greedy(tiny_ckpt, ray_session):
    llm = LLM(tiny_ckpt, num_stages=1, num_cpus_per_stage=STAGE_CPUS, max_num_seqs=2)
    try:
        return llm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=0))[0].outputs[0]
    finally:
        llm.shutdown()


def request(prompt=PROMPT, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        text=prompt, sampling=pb.SamplingOptions(**{"max_tokens": 10, "temperature": 0, **sampling})
    )


def test_generate_and_stream_match_llm_generate_and_http(stub, greedy, served):
    unary = stub.Generate(request(), metadata=META, timeout=120)
    assert list(unary.completions[0].token_ids) == greedy.token_ids
    assert (
        unary.completions[0].text == greedy.text
        and unary.completions[0].finish_reason == greedy.finish_reason
    )
    assert unary.usage.completion_tokens == len(greedy.token_ids)
    parts = list(stub.GenerateStream(request(), metadata=META, timeout=120))
    assert [t for p in parts for d in p.deltas for t in d.token_ids] == greedy.token_ids
    assert "".join(d.text for p in parts for d in p.deltas) == greedy.text
    assert parts[-1].finished and parts[-1].usage.completion_tokens == len(greedy.token_ids)
    http = requests.post(
        f"{served.base}/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 0},
        timeout=60,
    ).json()
    assert http["choices"][0]["text"] == greedy.text


def test_token_id_prompts_n_and_logprobs(stub):
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1, 261, 495]),
        sampling=pb.SamplingOptions(max_tokens=4, temperature=0, n=2, logprobs=2),
    )
    out = stub.Generate(req, metadata=META, timeout=120)
    assert len(out.completions) == 2 and list(out.prompt_token_ids) == [1, 261, 495]
    assert out.completions[0].token_ids == out.completions[1].token_ids
    lp = out.completions[0].logprobs[0]
    assert lp.token_id == out.completions[0].token_ids[0] and len(lp.top) >= 2


def test_score_equals_hf_log_likelihood(stub, tiny_ckpt):
    texts = [
        "hello world, the quick brown fox",
        "Ray starts the stage actors inside a placement group.",
    ]
    res = stub.Score(
        pb.ScoreRequest(texts=texts, return_token_logprobs=True), metadata=META, timeout=120
    )
    tok = hf_tokenizer(tiny_ckpt)
    for text, r in zip(texts, res.results):
        ids = list(r.token_ids)
        assert ids == tok(text).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(
                hf_model(tiny_ckpt)(torch.tensor([ids])).logits[0].double(), -1
            )
        expected = sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
        assert r.logprob == pytest.approx(expected, abs=1e-4)
        assert r.num_tokens == len(ids) and len(r.token_logprobs) == len(ids) - 1


def test_invalid_arguments_are_invalid_argument(stub):
    bad = [
        request(max_tokens=-3),
        request(temperature=-1.0),
        request(top_p=3.0),
        pb.GenerateRequest(),
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**7])),
    ]
    for req in bad:
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, metadata=META, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(request(max_tokens=0), metadata=META, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(pb.ScoreRequest(), metadata=META, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Health(pb.HealthRequest(), metadata=META, timeout=60).status == "ok"


def test_cancel_mid_stream_and_deadline_free_slots(stub, served):
    call = stub.GenerateStream(request(max_tokens=400, ignore_eos=True), metadata=META, timeout=120)
    got = 0
    for _ in call:
        got += 1
        if got == 3:
            call.cancel()
            break
    served.wait_idle(timeout=60)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request(max_tokens=400, ignore_eos=True), metadata=META, timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    served.wait_idle(timeout=60)
    assert stub.Generate(request(max_tokens=2), metadata=META, timeout=60).completions


def test_overload_is_resource_exhausted(stub, served):
    def one(_):
        try:
            stub.Generate(request(max_tokens=200, ignore_eos=True), metadata=META, timeout=300)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    with cf.ThreadPoolExecutor(48) as pool:
        codes = list(pool.map(one, range(48)))
    assert (
        set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        and "RESOURCE_EXHAUSTED" in codes
        and "OK" in codes
    )
    served.wait_idle()


def test_server_reflection_lists_the_service(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
            )
        )
    names = [s.name for s in resp.list_services_response.service]
    assert "jamba_ray.v1.JambaService" in names


def test_generated_modules_match_the_proto(tmp_path):
    from pathlib import Path

    from jamba_ray.proto.build import generate

    generate(tmp_path)
    here = Path(__file__).parents[2] / "jamba_ray" / "proto"
    for name in ("jamba_pb2.py", "jamba_pb2_grpc.py"):
        assert (tmp_path / "jamba_ray" / "proto" / name).read_text() == (here / name).read_text(), (
            name
        )
