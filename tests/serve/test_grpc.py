"""The gRPC API through Serve's gRPC proxy, with a real grpcio client, beside the HTTP API."""

from __future__ import annotations

import concurrent.futures as cf

import grpc
import pytest
import requests
import torch

from jamba_ray.proto import jamba_pb2 as pb
from jamba_ray.proto import jamba_pb2_grpc as pb_grpc
from tests.conftest import assert_greedy_like_hf, hf_model
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


def request(prompt=PROMPT, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        text=prompt, sampling=pb.SamplingOptions(**{"max_tokens": 10, "temperature": 0, **sampling})
    )


def test_generate_and_stream_match_transformers_and_http(stub, served, tiny_ckpt):
    unary = stub.Generate(request(), metadata=META, timeout=120)
    (c,) = unary.completions
    ids = list(c.token_ids)
    assert list(unary.prompt_token_ids) == hf_tokenizer(tiny_ckpt)(PROMPT).input_ids
    assert_greedy_like_hf(tiny_ckpt, list(unary.prompt_token_ids), ids)
    assert c.text == hf_tokenizer(tiny_ckpt).decode(ids, skip_special_tokens=True)
    assert c.finish_reason == ("length" if len(ids) == 10 else "stop")
    assert unary.usage.completion_tokens == len(ids)
    # The same request alone on the same server: the same batch shapes, so the same tokens.
    parts = list(stub.GenerateStream(request(), metadata=META, timeout=120))
    assert [t for p in parts for d in p.deltas for t in d.token_ids] == ids
    assert "".join(d.text for p in parts for d in p.deltas) == c.text
    assert parts[-1].finished and parts[-1].usage.completion_tokens == len(ids)
    http = requests.post(
        f"{served.base}/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 0},
        timeout=60,
    ).json()
    assert http["choices"][0]["text"] == c.text


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
    """Also when an earlier request left a prefix of a scored text cached (as any may)."""
    texts = [
        "hello world, the quick brown fox",
        "Ray starts the stage actors inside a placement group.",
    ]
    prefix = hf_tokenizer(tiny_ckpt)(texts[0]).input_ids[:6]
    stub.Generate(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=prefix), sampling=pb.SamplingOptions()),
        metadata=META,
        timeout=120,
    )
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
    """Each request ignores EOS and asks for 400 tokens: only an abort ends it sooner, and the
    token counts (this test's own, as deltas) tell which happened. A stream whose cancel Serve's
    gRPC proxy drops (see test_state_release.py) runs to 400 tokens and is tried again."""
    long = request(max_tokens=400, ignore_eos=True)
    for _ in range(3):
        before = served.wait_idle()
        call = stub.GenerateStream(long, metadata=META, timeout=120)
        got = 0
        for _ in call:
            got += 1
            if got == 3:
                call.cancel()
                break
        mid = served.wait_idle(timeout=60)
        assert mid["finished_requests"] - before["finished_requests"] == 1
        if mid["generated_tokens"] - before["generated_tokens"] < 400:
            break
    assert 3 <= mid["generated_tokens"] - before["generated_tokens"] < 400
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(long, metadata=META, timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = served.wait_idle(timeout=60)
    assert after["finished_requests"] - mid["finished_requests"] == 1
    assert after["generated_tokens"] - mid["generated_tokens"] < 400
    assert stub.Generate(request(max_tokens=2), metadata=META, timeout=60).completions


def test_overload_is_resource_exhausted(stub, served):
    def one(_):
        try:
            stub.Generate(request(max_tokens=120, ignore_eos=True), metadata=META, timeout=1200)
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
    """The committed modules describe exactly jamba.proto. Compared as descriptors, not as text:
    the generated text embeds the protobuf and grpcio-tools versions, which differ by machine."""
    from pathlib import Path

    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    root, out = Path(__file__).parents[2], tmp_path / "jamba.pb"
    args = ["protoc", f"-I{root}", f"--descriptor_set_out={out}", "jamba_ray/proto/jamba.proto"]
    assert protoc.main(args) == 0
    (want,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file

    def drop_json_names(messages):  # derived from the field names; the gencode leaves them out
        for m in messages:
            for field in m.field:
                field.ClearField("json_name")
            drop_json_names(m.nested_type)

    drop_json_names(want.message_type)
    assert descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb) == want
    methods = {m.name for m in want.service[0].method}
    assert {n for n in vars(pb_grpc.JambaServiceServicer) if not n.startswith("_")} == methods
