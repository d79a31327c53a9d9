"""The prefix cache over HTTP and gRPC: a repeated prompt reports its cached tokens."""

from openai import OpenAI

from tests.serve.conftest import MODEL

PROMPT = [1] + [(11 * i) % 400 + 40 for i in range(279)]  # 280 tokens: a checkpoint at 256


def test_a_repeated_prompt_reports_cached_tokens_and_the_same_text(served):
    client = OpenAI(base_url=f"{served.base}/v1", api_key="unused", max_retries=0)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    assert first.choices[0].text == second.choices[0].text
    assert second.usage.prompt_tokens == 280
    assert second.usage.prompt_tokens_details.cached_tokens >= 256
    stream = client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage][-1]
    assert usage.prompt_tokens_details.cached_tokens >= 256


def test_grpc_usage_reports_cached_tokens_too(served):
    import grpc

    from jamba_ray.proto import jamba_pb2 as pb
    from jamba_ray.proto import jamba_pb2_grpc as pb_grpc

    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingOptions(max_tokens=2, temperature=0)
    )
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as ch:
        stub = pb_grpc.JambaServiceStub(ch)
        meta = (("application", "jamba"),)
        stub.Generate(req, metadata=meta, timeout=120)
        second = stub.Generate(req, metadata=meta, timeout=120)
    assert second.usage.cached_tokens >= 256
