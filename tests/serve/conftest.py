"""One Serve instance per session: HTTP + gRPC proxies on loopback, the app on the tiny model."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from jamba_ray.config.pipeline_file import PipelineFile
from tests.conftest import STAGE_CPUS

MODEL = "jamba-test"


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
            "stages": 2,
            "resources.num_cpus": STAGE_CPUS,
            "serve.replica_cpus": 0.25,
            "serve.served_model_name": MODEL,
            "max_num_seqs": 8,
            "serve.max_waiting": 24,
            "max_batched_tokens": 64,
            "threads_per_stage": 1,
            "max_model_len": 512,
        }
    )
    return base.with_overrides(**overrides)


@pytest.fixture(scope="session")
def served(tiny_ckpt, ray_session):
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
