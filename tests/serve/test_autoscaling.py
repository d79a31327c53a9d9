"""Serve autoscaling adds and removes whole pipelines (replica + its stage actors) on what fills
them: the slots in use its replicas report (`serve/autoscale.py`'s policy). The default target,
ongoing requests, is Serve's own policy; what we hand it is checked in test_routing_policy.py."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
import time

import requests
from ray import serve

from jamba_ray.serve.app import deployment, engine_name
from tests.serve.conftest import (
    MODEL,
    metric_totals,
    pipeline_for_tests,
    replica_labels,
    wait_for,
)

APP = "scale"


def replicas() -> int:
    app = serve.status().applications.get(APP)
    if app is None or engine_name(MODEL) not in app.deployments:
        return 0
    return app.deployments[engine_name(MODEL)].replica_states.get("RUNNING", 0)


def test_load_adds_a_pipeline_and_idle_removes_it_without_failures(served, tiny_ckpt):
    pipeline = pipeline_for_tests(
        **{
            "num_stages": 1,
            "serve.autoscaling.min_replicas": 1,
            "serve.autoscaling.max_replicas": 2,
            "serve.autoscaling.target": "slots",
            "serve.autoscaling.target_value": 1,  # 6 heavy requests want 6 pipelines: 2 at most
            "serve.autoscaling.upscale_delay_s": 0.5,
            "serve.autoscaling.downscale_delay_s": 2,
            "serve.autoscaling.look_back_period_s": 3,  # (> the suite's 1 s metrics push)
        }
    )
    serve.run(
        deployment(pipeline.to_config(tiny_ckpt)), name=APP, route_prefix=f"/{APP}", blocking=False
    )
    url = f"{served.base}/{APP}/v1/completions"

    def metrics() -> str:
        return requests.get(f"{served.base}/{APP}/metrics", timeout=30).text

    def two_in(text: str) -> str | None:
        return text if len(replica_labels(text)) == 2 else None

    wait_for(lambda: replicas() == 1, 180, what="first replica")
    stop = threading.Event()
    statuses: list[int] = []

    def load(max_tokens: int):
        while not stop.is_set():
            r = requests.post(
                url,
                json={
                    "model": MODEL,
                    "prompt": "scale",
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                },
                timeout=300,
            )
            statuses.append(r.status_code)

    try:
        with running(stop, [(load, 80)] * 6) as heavy:
            wait_for(lambda: replicas() >= 2, 240, what="scale up under load")
            # /metrics merges every pipeline's samples, each under its own replica label
            text = wait_for(lambda: two_in(metrics()), 120, what="both pipelines in /metrics")
            assert metric_totals(text)["jamba_ray_slots_total"] == 2 * 8  # 8 slots each
            # /v1/stats reports each pipeline too: the same replicas, each its own slots
            stats = requests.get(f"{served.base}/{APP}/v1/stats", timeout=30).json()
            ids = [r["engine"]["replica"] for r in stats["replicas"]]
            assert set(ids) == replica_labels(text), (ids, replica_labels(text))
            assert [r["slots_total"] for r in stats["replicas"]] == [8, 8]
            assert stats["engine"]["replica"] == min(ids)
            stop.set()
            for f in heavy:
                f.result()
        stop.clear()
        with running(stop, [(load, 2)]) as trickle:  # a trickle of requests while it scales down
            wait_for(lambda: replicas() == 1, 240, what="scale down when idle")
            time.sleep(2)
            stop.set()
            trickle[0].result()
        assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    finally:
        stop.set()
        serve.delete(APP)


@contextlib.contextmanager
def running(stop: threading.Event, calls: list):
    """Threads running `calls` until `stop`; a check that fails inside stops them too (leaving
    the block waits for them: an unset `stop` would hang the test instead of failing it)."""
    pool = cf.ThreadPoolExecutor(len(calls))
    try:
        yield [pool.submit(fn, *args) for fn, *args in calls]
    finally:
        stop.set()
        pool.shutdown(wait=True)
