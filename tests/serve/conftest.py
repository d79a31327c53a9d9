"""One Serve instance per session: HTTP + gRPC proxies on loopback, the app on the tiny model."""

from __future__ import annotations

import re
import socket
import time

import grpc
import requests
from ray import serve

from jamba_ray.config.pipeline_file import PipelineFile
from jamba_ray.proto import jamba_pb2_grpc as pb_grpc
from tests.conftest import STAGE_CPUS

MODEL = "jamba-test"
# an engine replica's label on its samples: last (`model="a",replica="r"`) or first of several
REPLICA_LABEL = re.compile(r',replica="[^"]*"|replica="[^"]*",?')


def metric_totals(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value}, summed over the `replica` label (every engine
    replica's samples carry one)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            series = REPLICA_LABEL.sub("", series).replace("{}", "")
            out[series] = out.get(series, 0.0) + float(value)
    return out


def replica_labels(text: str) -> set[str]:
    return set(re.findall(r'replica="([^"]*)"', text))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, every: float = 0.5, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Served:
    def __init__(self, http_port: int, grpc_port: int):
        self.http_port, self.grpc_port = http_port, grpc_port
        self.base = f"http://127.0.0.1:{http_port}"

    def stats(self) -> dict:
        return requests.get(f"{self.base}/v1/stats", timeout=30).json()

    def wait_idle(self, timeout: float = 60) -> dict:
        """Until no request runs or waits and every stage holds 0 slots."""

        def idle():
            s = self.stats()
            ok = (
                s["requests_running"] == 0 and s["requests_waiting"] == 0 and s["slots_in_use"] == 0
            )
            return s if ok else None

        return wait_for(idle, timeout, what="all slots free")


def pipeline_for_tests(**overrides) -> PipelineFile:
    base = PipelineFile.default().with_overrides(
        **{
            "num_stages": 2,
            "num_cpus_per_stage": STAGE_CPUS,
            "serve.replica_cpus": 0.25,
            "serve.ingress.num_cpus": 0.1,
            "serve.served_model_name": MODEL,
            "max_num_seqs": 8,
            "max_waiting": 24,
            "max_batched_tokens": 64,
            "serve.graceful_shutdown_timeout_s": 20,  # (tests delete apps with nothing in flight)
            "threads_per_stage": 1,
            "max_model_len": 512,
        }
    )
    return base.with_overrides(**overrides)


def deploy(served, tiny_ckpt, name: str, **overrides) -> str:
    """One more app beside the session's, on the same Serve instance; its HTTP base URL."""
    from jamba_ray.serve.app import deployment

    pipeline = pipeline_for_tests(**overrides)
    serve.run(
        deployment(pipeline.to_config(tiny_ckpt)),
        name=name,
        route_prefix=f"/{name}",
        blocking=False,
    )
    base = f"{served.base}/{name}"
    wait_for(lambda: requests.get(f"{base}/health", timeout=60).ok, 180, what=f"{name} app")
    return base


def grpc_stub(served):
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    return channel, pb_grpc.JambaServiceStub(channel)


def sse_events(response) -> list[str]:
    return [ln.decode()[len("data: ") :] for ln in response.iter_lines() if ln]


def app_stats(base: str, headers=None) -> dict:
    return requests.get(f"{base}/v1/stats", timeout=30, headers=headers).json()


def wait_app_idle(base: str, headers=None, timeout: float = 60) -> dict:
    def idle():
        s = app_stats(base, headers)
        return s if s["slots_in_use"] == 0 and s["requests_running"] == 0 else None

    return wait_for(idle, timeout, what="all slots free")


def start_served(tiny_ckpt):
    """The session's server (the `served` fixture, defined once in tests/conftest.py so that the
    serve tests and README's server blocks share one: a second definition would start a second
    app whose ports Serve's running proxy never opens)."""
    from ray import serve

    from jamba_ray.serve.launch import start

    http_port, grpc_port = free_port(), free_port()
    pipeline = pipeline_for_tests(
        **{
            "serve.port": http_port,
            "serve.grpc_port": grpc_port,
            "serve.max_body_bytes": 64 * 1024,
            "serve.max_prompt_tokens": 300,
            "serve.max_tokens_limit": 400,
        }
    )
    start(pipeline.to_config(tiny_ckpt))
    s = Served(http_port, grpc_port)
    wait_for(lambda: requests.get(f"{s.base}/health", timeout=60).ok, 180, what="health")
    yield s
    serve.shutdown()
