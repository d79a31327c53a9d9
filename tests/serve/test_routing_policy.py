"""The router's and the autoscaler's settings and policies as pure units (no Serve started): what
a pipeline file turns into, what the router reads from an engine call, how many replicas a fill
target asks for."""

import pytest
from ray.serve.config import AutoscalingContext

from jamba_ray.config.engine_config import EngineAutoscalingConfig, RouterConfig
from jamba_ray.engine.prefix_report import Load
from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.errors import ConfigError
from jamba_ray.serve.autoscale import (
    POLICY_PATH,
    PipelineFill,
    desired_replicas,
    fill_metrics,
    serve_autoscaling,
)
from jamba_ray.serve.router import PrefixRouter, request_router_config, request_tokens
from tests.serve.conftest import pipeline_for_tests


def test_the_router_reads_token_ids_and_salt_from_the_engine_call_by_position_or_name():
    params = SamplingParams(cache_salt="s")
    assert request_tokens(([1, 2, 3], params, "rid"), {}) == ([1, 2, 3], "s")
    assert request_tokens((), {"token_ids": [4, 5], "params": SamplingParams()}) == ([4, 5], None)
    assert request_tokens(([1], SamplingParams(), "r"), {"cache_salt": "k"}) == ([1], "k")
    assert request_tokens(("a prompt",), {}) is None  # not token ids: routed by load
    assert request_tokens(([],), {}) is None


def test_a_pipeline_file_chooses_the_router_and_its_threshold():
    cfg = (
        pipeline_for_tests(
            **{"serve.router.policy": "prefix", "serve.router.imbalance_threshold": 3}
        )
        .to_config("M")
        .serve
    )
    rc = request_router_config(cfg.router, block_size=16, checkpoint_every=64)
    assert rc.request_router_class.endswith("serve.router.PrefixRouter")
    assert rc.request_router_kwargs["imbalance_threshold"] == 3
    assert rc.request_router_kwargs["block_size"] == 16
    default = request_router_config(RouterConfig(policy="default"), 16, 64)
    assert default.is_default_request_router()
    assert PrefixRouter.__name__ in rc.request_router_class


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"serve.router.policy": "nearest"}, "serve.router.policy"),
        ({"serve.autoscaling.target": "gpus"}, "serve.autoscaling.target"),
        ({"serve.router.imbalance_threshold": -1}, "serve.router.imbalance_threshold"),
    ],
)
def test_bad_router_and_autoscaling_settings_are_refused_by_name(bad, field, tmp_path):
    import yaml

    from jamba_ray.config.pipeline_file import PipelineFile

    *sections, key = field.split(".")
    layout = {"name": "x", "serve": {sections[1]: {key: next(iter(bad.values()))}}}
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(layout))
    with pytest.raises(ConfigError, match=key):
        PipelineFile.load(f)
    with pytest.raises(ConfigError, match=field):
        (RouterConfig if "router" in field else EngineAutoscalingConfig)(**{key: bad[field]})


def test_ongoing_requests_is_serves_own_policy_and_a_fill_target_is_ours():
    plain = serve_autoscaling(EngineAutoscalingConfig(max_replicas=3))
    assert "policy" not in plain and "target" not in plain and plain["max_replicas"] == 3
    ours = serve_autoscaling(EngineAutoscalingConfig(target="blocks", target_value=100.0))
    assert ours["policy"] == {
        "policy_function": POLICY_PATH,
        "policy_kwargs": {"target": "blocks", "target_value": 100.0},
    }


def ctx(metrics: dict, current: int = 2, target_now: int = 2) -> AutoscalingContext:
    """Serve's own context object, as its controller builds it each tick."""
    return AutoscalingContext(
        deployment_id=None, deployment_name="e", app_name="a",
        current_num_replicas=current, target_num_replicas=target_now,
        running_replicas=[], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=metrics, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8,
        policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=None,
    )  # fmt: skip


def test_a_fill_target_asks_for_the_replicas_that_hold_the_total_at_the_target_each():
    load = Load(6, 8, 90, 100, 6, 3, 300)
    m = fill_metrics(load, max_batched_tokens=64)
    assert m["slots"] == 6 and m["blocks_capacity"] == 100 and m["prefill_tokens"] == 300
    two = {k: {"r1": v, "r2": v} for k, v in m.items()}
    assert PipelineFill("slots", target_value=4)(ctx(two)) == (3.0, {})  # 12 slots, 4 each
    assert PipelineFill("blocks")(ctx(two))[0] == pytest.approx(180 / 75)  # 3/4 of capacity
    assert PipelineFill("prefill_tokens")(ctx(two))[0] == pytest.approx(600 / 64)
    assert PipelineFill("slots")(ctx({}, target_now=2)) == (2, {})  # nothing reported: stay
    assert desired_replicas(two, current=0, target="slots", target_value=1) is None
    with pytest.raises(ValueError, match="target"):
        PipelineFill("gpus")
