"""Two engine replicas (pipelines) behind the prefix router, on real Serve: a request goes to the
replica that holds its prefix; another cache_salt shares nothing; an overloaded holder is passed
over; Serve's default router still serves when configured; and the fill metric reaches Serve's
controller (the autoscaler scales an idle deployment down on it).

Which replica served what is read from each replica's own report (its prefix-cache counters),
called on the replica actors directly."""

from __future__ import annotations

import uuid

import ray
from ray import serve

from jamba_ray.engine.prefix_report import PrefixReport
from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.serve.app import engine_app, engine_name
from tests.serve.conftest import MODEL, pipeline_for_tests, wait_for

APP = "routed"
SHARED = list(range(5, 53))  # 48 tokens: checkpoints every 16 (checkpoint_every below)
SETTINGS = {
    "num_stages": 1,
    "checkpoint_every": 16,
    "serve.router.imbalance_threshold": 1,
    "serve.router.stats_period_s": 0.5,
    "serve.autoscaling.min_replicas": 1,
    "serve.autoscaling.max_replicas": 2,
    "serve.autoscaling.initial_replicas": 2,
    "serve.autoscaling.target": "slots",
    "serve.autoscaling.target_value": 1,
    "serve.autoscaling.look_back_period_s": 1,
    "serve.autoscaling.upscale_delay_s": 0,
    "serve.autoscaling.downscale_delay_s": 600,  # (shortened for the last check)
}


def deploy(**changes):
    config = pipeline_for_tests(**{**SETTINGS, **changes}).to_config(MODEL_PATH[0])
    return serve.run(engine_app(config, MODEL), name=APP, route_prefix=None)


MODEL_PATH: list[str] = []


def counters() -> dict[str, tuple[int, int]]:
    """replica actor name -> (prompt tokens looked up, prompt tokens resumed), from its report."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"{APP}#" in a["name"] and a.get("namespace", "serve") == "serve"
    ]
    out = {}
    for name in names:
        stats = ray.get(ray.get_actor(name, namespace="serve").record_routing_stats.remote())
        rep = PrefixReport.from_dict(stats)
        out[name] = (rep.prefix_queries, rep.prefix_hits)
    return out


def generate(handle, ids, salt=None, max_tokens=4):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, cache_salt=salt)
    rid = uuid.uuid4().hex
    return handle.options(stream=True).generate.remote(ids, params, rid, "generate", salt)


def running() -> int:
    app = serve.status().applications.get(APP)
    dep = app.deployments.get(engine_name(MODEL)) if app else None
    return dep.replica_states.get("RUNNING", 0) if dep else 0


def test_requests_go_where_their_prefix_is_held_within_the_load_threshold(served, tiny_ckpt):
    MODEL_PATH[:] = [tiny_ckpt]
    handle = deploy()
    try:
        list(generate(handle, SHARED + [1, 2, 3]))
        first = counters()
        holder = next(n for n, (q, _) in first.items() if q > 0)
        other = next(n for n in first if n != holder)

        list(generate(handle, SHARED + [7, 7]))  # the same 48 tokens, then others
        after = counters()
        assert after[holder][1] - first[holder][1] == 48, after
        assert after[other] == (0, 0), after

        list(generate(handle, SHARED + [7, 7], salt="tenant-b"))  # shares nothing
        salted = counters()
        assert all(salted[n][1] == after[n][1] for n in salted), salted

        # three at once with threshold 1: the holder takes two, then it is passed over
        streams = [generate(handle, SHARED + [9, i], max_tokens=48) for i in range(3)]
        for s in streams:
            list(s)
        busy = counters()
        assert busy[other][0] > 0 and busy[holder][1] > salted[holder][1], busy

        # Serve's own router when configured (a new handle picks it up); then the fill metric:
        # with idle slots our policy asks for none, so the deployment drops to min_replicas
        deploy(**{"serve.router.policy": "default", "serve.autoscaling.downscale_delay_s": 1})
        default = serve.get_app_handle(APP)
        outs = [list(generate(default, SHARED + [3, i])) for i in range(2)]
        assert all(outs), outs
        wait_for(lambda: running() == 1, 120, what="scale down on the reported slots")
    finally:
        serve.delete(APP)
