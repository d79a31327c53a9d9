"""Serve autoscaling adds and removes whole pipelines (replica + its stage actors)."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import requests
from ray import serve

from jamba_ray.serve.app import deployment, engine_name
from tests.serve.conftest import MODEL, pipeline_for_tests, wait_for

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
            "serve.autoscaling.target_ongoing_requests": 1,
            "serve.autoscaling.upscale_delay_s": 0.5,
            "serve.autoscaling.downscale_delay_s": 2,
            "serve.autoscaling.look_back_period_s": 3,  # (> the suite's 1 s metrics push)
        }
    )
    serve.run(
        deployment(pipeline.to_config(tiny_ckpt)), name=APP, route_prefix=f"/{APP}", blocking=False
    )
    url = f"{served.base}/{APP}/v1/completions"
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
        with cf.ThreadPoolExecutor(6) as pool:
            heavy = [pool.submit(load, 80) for _ in range(6)]
            wait_for(lambda: replicas() >= 2, 240, what="scale up under load")
            stop.set()
            for f in heavy:
                f.result()
        stop.clear()
        with cf.ThreadPoolExecutor(1) as pool:  # a trickle of requests while it scales down
            trickle = pool.submit(load, 2)
            wait_for(lambda: replicas() == 1, 240, what="scale down when idle")
            time.sleep(2)
            stop.set()
            trickle.result()
        assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    finally:
        stop.set()
        serve.delete(APP)
