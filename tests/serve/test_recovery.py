"""Stage recovery seen from Serve (issue #17, items 4-6): stages SIGKILLed under concurrent streams,
one of them while the other's replacement is still loading, under a 1 s Serve health check; and an
app deleted while a stream is in flight. One app (3 stages, beside the session's) serves both."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
from dataclasses import dataclass, field

import grpc
import openai
import pytest
import ray
import requests
from ray import serve

from jamba_ray.proto import jamba_pb2 as pb
from jamba_ray.proto import jamba_pb2_grpc as pb_grpc
from jamba_ray.serve.app import engine_name
from jamba_ray.serve.errors import RETRY_AFTER_S

try:  # the HTTP library the openai client is built on (httpx2 from openai 3 on)
    import httpx2 as httpx
except ImportError:
    import httpx

from tests.conftest import steps_before_tie
from tests.serve.conftest import MODEL, app_stats, deploy, wait_app_idle, wait_for

APP = "recovery"
DELAY_S = 4  # replacement stages sleep this long before loading: 4 Serve health-check periods
MAX_TOKENS = 40
QUESTIONS = [f"Tell me about pipeline stage number {i}." for i in range(6)]


@pytest.fixture(scope="module")
def app(served, tiny_ckpt):
    """3 stages, each replacement slow to load (the knob reaches the replica through deploy()),
    Serve checking the replica's health every second and draining for up to 60 s on delete."""
    knob = "JAMBA_RAY_REPLACEMENT_DELAY_S"
    old = os.environ.get(knob)
    os.environ[knob] = str(DELAY_S)
    try:
        overrides = {"serve.health_check_period_s": 1, "serve.graceful_shutdown_timeout_s": 60}
        yield deploy(served, tiny_ckpt, APP, num_stages=3, max_stage_restarts=4, **overrides)
    finally:
        if old is None:
            os.environ.pop(knob, None)
        else:
            os.environ[knob] = old
        if APP in serve.status().applications:
            serve.delete(APP)


class Tee(httpx.HTTPTransport):
    """The bytes on the wire, as the openai client receives them: its stream iterator ends quietly
    whether or not `[DONE]` came, so that the stream ended normally is checked on the raw SSE."""

    def __init__(self):
        super().__init__()
        self.raw = bytearray()

    def handle_request(self, request):
        response = super().handle_request(request)
        inner, raw = response.stream, self.raw

        class Stream(httpx.SyncByteStream):
            def __iter__(self):
                for chunk in inner:
                    raw.extend(chunk)
                    yield chunk

            def close(self):
                inner.close()

        response.stream = Stream()
        return response


@dataclass
class Streamed:
    tokens: list[str] = field(default_factory=list)
    top2: list[list[float]] = field(default_factory=list)  # the two best logprobs of each step
    finish_reason: str | None = None
    raw: bytes = b""

    @property
    def clear(self) -> int:
        """Leading steps that are clear calls (a step with under two entries counts as a tie)."""
        return steps_before_tie([t if len(t) == 2 else (0.0, 0.0) for t in self.top2])


def stream_chat(base: str, question: str, max_tokens: int = MAX_TOKENS, progress=None) -> Streamed:
    """One greedy chat completion streamed by the openai client, EOS ignored, with logprobs."""
    tee = Tee()
    http = httpx.Client(transport=tee, timeout=300)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", http_client=http, max_retries=0)
    out = Streamed()
    with http:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            for choice in chunk.choices:
                for entry in (choice.logprobs.content if choice.logprobs else None) or []:
                    out.tokens.append(entry.token)
                    out.top2.append(sorted((t.logprob for t in entry.top_logprobs), reverse=True))
                out.finish_reason = choice.finish_reason or out.finish_reason
            if progress is not None:
                progress(len(out.tokens))
    out.raw = bytes(tee.raw)
    return out


def assert_ended_normally(s: Streamed, length: int) -> None:
    """All tokens, finish_reason "length", no error event, and the stream closed by [DONE]."""
    assert len(s.tokens) == length and s.finish_reason == "length", (len(s.tokens), s.finish_reason)
    events = [ln for ln in s.raw.decode().split("\n") if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events[:-1])


def health(base: str) -> tuple[int, str | None, str | None]:
    """(HTTP status, the body's "status" or else its text, Retry-After)."""
    r = requests.get(f"{base}/health", timeout=120)
    try:
        status = r.json().get("status")
    except ValueError:  # not ours: Serve's proxy answering in plain text
        status = r.text[:200]
    return r.status_code, status, r.headers.get("Retry-After")


def replica_names(app_name: str) -> set[str]:
    """Serve names each replica actor after its app, deployment and a fresh id: an engine replica
    that Serve replaced would show up under another name."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    prefix = f"SERVE_REPLICA::{app_name}#{engine_name(MODEL)}#"
    return {a["name"] for a in actors if a["name"].startswith(prefix)}


def grpc_health(served) -> tuple[str, str]:
    """(status code name, details) of the recovery app's gRPC Health."""
    with grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}") as channel:
        stub = pb_grpc.JambaServiceStub(channel)
        try:
            reply = stub.Health(pb.HealthRequest(), metadata=(("application", APP),), timeout=60)
            return "OK", reply.status
        except grpc.RpcError as e:
            return e.code().name, e.details()


def test_stages_killed_under_streams_and_during_replacement_lose_nothing(app, served):
    before = wait_app_idle(app)
    replica = replica_names(APP)
    assert len(replica) == 1
    with cf.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        reference = list(pool.map(lambda q: stream_chat(app, q), QUESTIONS))
    for r in reference:
        assert_ended_normally(r, MAX_TOKENS)

    pids = [s["pid"] for s in app_stats(app)["stages"]]
    seen = [0] * len(QUESTIONS)
    begun = threading.Event()

    def progress(i):
        def note(n):
            seen[i] = n
            if min(seen) >= 3:
                begun.set()

        return note

    answers = []  # every /health answer from the first kill until it says "ok" again
    with cf.ThreadPoolExecutor(len(QUESTIONS) + 1) as pool:
        streams = [
            pool.submit(stream_chat, app, q, MAX_TOKENS, progress(i))
            for i, q in enumerate(QUESTIONS)
        ]
        assert begun.wait(180), seen
        at_kill = list(seen)
        os.kill(pids[1], signal.SIGKILL)
        answers.append(
            wait_for(
                lambda: (h := health(app))[1] == "recovering" and h,
                60,
                every=0.1,
                what="/health to say recovering",
            )
        )
        # stage 1's replacement sleeps DELAY_S before loading: stage 2 dies while it does
        os.kill(pids[2], signal.SIGKILL)
        during = grpc_health(served)
        late = pool.submit(
            requests.post,
            f"{app}/v1/completions",
            json={"model": MODEL, "prompt": "late", "max_tokens": 4, "temperature": 0},
            timeout=300,
        )

        def recovered():
            answers.append(health(app))
            return answers[-1][0] == 200

        wait_for(recovered, 180, every=0.2, what="/health to say ok")
        disturbed = [f.result() for f in streams]
        late = late.result()

    # the kill came while every stream was under way
    assert all(3 <= n < MAX_TOKENS for n in at_kill), at_kill
    # one recovery, started over for the second death: 503 + Retry-After until "ok"
    assert all(a == (503, "recovering", str(RETRY_AFTER_S)) for a in answers[:-1]), answers
    assert answers[-1][:2] == (200, "ok")
    assert during[0] == "UNAVAILABLE" and "recovering" in during[1], during
    assert grpc_health(served) == ("OK", "ok")
    assert health(app)[:2] == (200, "ok")
    assert late.status_code == 200 and late.json()["choices"][0]["finish_reason"] == "length"
    for ref, got in zip(reference, disturbed):
        assert_ended_normally(got, MAX_TOKENS)
        clear = ref.clear  # replayed state agrees to float rounding: tokens match up to a near-tie
        assert got.tokens[:clear] == ref.tokens[:clear], (clear, got.tokens, ref.tokens)

    # the same replica and engine throughout: Serve restarted nothing (a replica whose health
    # check failed would be replaced, and would drain these very streams first), its counters ran
    # on, and the stage that was never killed is the same process
    assert replica_names(APP) == replica
    after = wait_app_idle(app, timeout=120)
    assert after["slots_in_use"] == 0 and after["requests_running"] == 0
    assert after["stage_restarts"] - before["stage_restarts"] == 2
    finished = 2 * len(QUESTIONS) + 1
    assert after["finished_requests"] - before["finished_requests"] == finished
    new_pids = [s["pid"] for s in after["stages"]]
    assert new_pids[0] == pids[0] and len(set(new_pids + pids)) == 5
    status = serve.status().applications[APP]
    assert status.status == "RUNNING"
    assert status.deployments[engine_name(MODEL)].replica_states == {"RUNNING": 1}


def test_deleting_the_app_lets_a_stream_in_flight_finish(app):
    """Serve drains the replica (up to graceful_shutdown_timeout_s) before it stops it, streams
    included. The route goes away soon after the deletion starts (not at once: a request in that
    gap still reaches the draining replica and is served); from then on new requests get 404."""
    long = 256
    seen = [0]
    begun = threading.Event()

    def progress(n):
        seen[0] = n
        if n >= 3:
            begun.set()

    with cf.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(stream_chat, app, QUESTIONS[0], long, progress)
        assert begun.wait(180)
        deleting = pool.submit(serve.delete, APP)
        wait_for(
            lambda: (
                serve.status().applications.get(APP) is None
                or serve.status().applications[APP].status == "DELETING"
            ),
            60,
            every=0.1,
            what="the app to be deleting",
        )
        # Serve takes the route away while the replica drains: new requests stop reaching it
        wait_for(
            lambda: requests.get(f"{app}/health", timeout=60).status_code == 404,
            60,
            every=0.1,
            what="the route to be gone",
        )
        in_flight = not stream.done()
        got = stream.result()
        deleting.result()
    assert in_flight  # (the route went away with the stream under way)
    assert_ended_normally(got, long)
    assert APP not in serve.status().applications
    r = requests.post(f"{app}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=60)
    assert r.status_code == 404
