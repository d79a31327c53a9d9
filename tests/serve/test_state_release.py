"""Requests that end early give back every KV block: after HTTP clients leave mid-stream (requests
and the openai client, n=1 and forked n=3, completions and chat), gRPC calls are cancelled or
meet their deadline, the server is idle with only its checkpoints holding blocks.

Every request ignores EOS and asks for 400 tokens per sample: only an abort ends it sooner, and
the token counts tell that it was aborted (a request that ran on would free its blocks by
finishing, and prove nothing). One request at a time, so that each count is its own. The
server-side request timeout is covered in test_failures.py (its app has a 4 s one).
"""

from __future__ import annotations

import grpc
import openai
import requests

from jamba_ray.proto import jamba_pb2 as pb
from tests.serve.conftest import MODEL, grpc_stub, metric_totals

META = (("application", "jamba"),)
LONG = 400  # the session server's max_tokens limit
# ~60 tokens: several 16-token blocks each, so a leak shows
PROMPT = "Ray starts the stage actors inside a placement group, " * 4


def ends_and_gives_back_its_blocks(served, end) -> int:
    """`end()` leaves one request early; then the server is idle and only the checkpoints hold KV
    blocks (/metrics says the same). Returns the tokens the request generated."""
    before = served.wait_idle()
    end()
    after = served.wait_idle(timeout=120)
    assert after["finished_requests"] - before["finished_requests"] == 1
    assert after["kv_blocks_in_use"] == after["kv_blocks_held_by_checkpoints"], after
    metrics = requests.get(f"{served.base}/metrics", timeout=30).text
    assert metric_totals(metrics)["jamba_ray_kv_blocks_in_use"] == after["kv_blocks_in_use"]
    return after["generated_tokens"] - before["generated_tokens"]


def ends_early_and_gives_back_its_blocks(served, n: int, end) -> None:
    """... and the request of `n` samples ended well short of its length (it was aborted)."""
    assert ends_and_gives_back_its_blocks(served, end) < n * LONG / 2


def grpc_stream_ends_early_and_gives_back_its_blocks(served, n: int, end) -> None:
    """As above, for a gRPC stream. Serve's gRPC proxy (Ray 2.60) drops a client's cancel that
    lands while it writes a message: GeneratorExit at its `yield result` (proxy.py,
    send_request_to_replica), and the response it holds is never cancelled, so the ingress never
    hears of it. Such a call runs to its full length and then gives back its blocks (checked);
    it is tried again, up to 3 times in all (about 1 cancel in 20 lands there on this machine)."""
    for _ in range(3):
        generated = ends_and_gives_back_its_blocks(served, end)
        if generated < n * LONG:  # the cancel reached the ingress
            break
    assert generated < n * LONG / 2


def leave_http_stream(served, route: str, body: dict, events: int) -> None:
    """Stream with `requests`, read `events` SSE events, close the connection."""
    body = {"model": MODEL, "max_tokens": LONG, "ignore_eos": True, "stream": True, **body}
    with requests.post(f"{served.base}/v1/{route}", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for i, _ in enumerate(line for line in r.iter_lines() if line):
            if i + 1 >= events:
                break


def leave_openai_stream(served, n: int, chunks: int) -> None:
    client = openai.OpenAI(base_url=f"{served.base}/v1", api_key="-", timeout=120, max_retries=0)
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=LONG,
        n=n,
        seed=n,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i + 1 >= chunks:
            break
    stream.close()


def test_http_clients_that_leave_mid_stream_give_back_every_block(served):
    chat = {"messages": [{"role": "user", "content": PROMPT}]}
    leaves = [  # (n, how the client leaves)
        (1, lambda: leave_http_stream(served, "completions", {"prompt": PROMPT}, 3)),
        (3, lambda: leave_http_stream(served, "completions", {"prompt": PROMPT, "n": 3}, 7)),
        (1, lambda: leave_http_stream(served, "chat/completions", chat, 5)),
        (2, lambda: leave_http_stream(served, "chat/completions", {**chat, "n": 2}, 1)),
        (1, lambda: leave_openai_stream(served, n=1, chunks=4)),
        (3, lambda: leave_openai_stream(served, n=3, chunks=2)),
    ]
    for n, leave in leaves:
        ends_early_and_gives_back_its_blocks(served, n, leave)


def grpc_request(n: int) -> pb.GenerateRequest:
    sampling = pb.SamplingOptions(max_tokens=LONG, ignore_eos=True, n=n, seed=5)
    return pb.GenerateRequest(text=PROMPT, sampling=sampling)


def cancel_grpc_stream(stub, n: int, parts: int) -> None:
    call = stub.GenerateStream(grpc_request(n), metadata=META, timeout=120)
    for i, _ in enumerate(call):
        if i + 1 >= parts:
            call.cancel()
            break


def miss_grpc_deadline(stub, n: int, streaming: bool) -> None:
    """The client's deadline passes mid-generation: the server sees the call cancelled."""
    try:
        if streaming:
            list(stub.GenerateStream(grpc_request(n), metadata=META, timeout=0.5))
        else:
            stub.Generate(grpc_request(n), metadata=META, timeout=0.5)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        raise AssertionError("a 400-token request finished within 0.5 s")


def test_grpc_calls_cancelled_or_past_their_deadline_give_back_every_block(served):
    channel, stub = grpc_stub(served)
    with channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        unary = [  # (n, how the call ends)
            (1, lambda: miss_grpc_deadline(stub, n=1, streaming=False)),
            (2, lambda: miss_grpc_deadline(stub, n=2, streaming=False)),
        ]
        for n, end in unary:
            ends_early_and_gives_back_its_blocks(served, n, end)
        streams = [
            (1, lambda: cancel_grpc_stream(stub, n=1, parts=3)),
            (3, lambda: cancel_grpc_stream(stub, n=3, parts=5)),
            (3, lambda: miss_grpc_deadline(stub, n=3, streaming=True)),
        ]
        for n, end in streams:
            grpc_stream_ends_early_and_gives_back_its_blocks(served, n, end)
