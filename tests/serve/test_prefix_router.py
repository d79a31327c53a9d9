"""Two engine replicas (pipelines) behind the prefix router, on real Serve: a request goes to the
replica that holds its prefix; another cache_salt shares nothing; an overloaded holder is passed
over. (Serve's own router is the default every other Serve test runs on; autoscaling on the
fill metric is test_autoscaling.py's.)

Which replica served what is read from each replica's own report (its prefix-cache counters),
called on the replica actors directly."""

from __future__ import annotations

import uuid

import ray
from ray import serve

from jamba_ray.engine.prefix_report import PrefixReport
from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.serve.app import engine_app
from tests.serve.conftest import MODEL, pipeline_for_tests

APP = "routed"
SHARED = list(range(5, 53))  # 48 tokens: checkpoints every 16 (checkpoint_every below)
SETTINGS = {
    "num_stages": 1,
    "serve.router.policy": "prefix",
    "checkpoint_every": 16,
    "serve.router.imbalance_threshold": 1,
    "serve.router.stats_period_s": 0.5,
    "serve.autoscaling.min_replicas": 2,
    "serve.autoscaling.max_replicas": 2,
}


def deploy():
    config = pipeline_for_tests(**SETTINGS).to_config(MODEL_PATH[0])
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


def started(stream):
    """A long request, queued on its replica (its first item), still running."""
    assert next(stream) == "queued"
    return stream


def test_requests_go_where_their_prefix_is_held_within_the_load_threshold(served, tiny_ckpt):
    MODEL_PATH[:] = [tiny_ckpt]
    handle = deploy()
    try:
        list(generate(handle, SHARED + [1, 2, 3]))
        first = counters()
        holder = next(n for n, (q, _) in first.items() if q > 0)
        other = next(n for n in first if n != holder)

        # The holder runs one long request (it goes there: it holds the prefix); one more with
        # the prefix still goes there, 1 ongoing request over the other being within threshold 1
        long = [started(generate(handle, SHARED + [8], max_tokens=400))]
        list(generate(handle, SHARED + [7, 7]))
        after = counters()
        assert after[holder][1] - first[holder][1] >= 2 * 48, after  # the long one and this one
        assert after[other] == (0, 0), after

        # with two running there, it is passed over: beyond the threshold
        long.append(started(generate(handle, SHARED + [8, 1], max_tokens=400)))
        list(generate(handle, SHARED + [7, 7, 7]))
        busy = counters()
        assert busy[other][0] > 0 and busy[other][1] == 0, busy
        for s in long:
            s.cancel()

        list(generate(handle, SHARED + [7, 7], salt="tenant-b"))  # shares nothing
        salted = counters()
        assert all(salted[n][1] == busy[n][1] for n in salted), salted
    finally:
        serve.delete(APP)
