"""The cluster prefix tier (runtime/prefix_tier.py) on real Ray: an engine publishes; with its
local cache emptied (a fresh replica's) it imports a prefix and continues exactly as a cold run;
a tier that is gone, before the lookup or between lookup and import, costs a recompute at most,
never a request. (One engine: a second would double the test's cost, and in one test process
both would share the driver anyway; the tier owns what it stores either way.)
"""

from __future__ import annotations

import time

import pytest
import torch

from jamba_ray.engine.llm import LLM
from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.runtime.prefix_tier import NAMESPACE
from tests.conftest import STAGE_CPUS

OPTIONS = dict(num_stages=2, max_model_len=256, checkpoint_every=64)
TIER = dict(OPTIONS, num_cpus_per_stage=STAGE_CPUS, prefix_tier=True, prefix_tier_min_tokens=8)
# three "system prompts" of 150 tokens: 9 full blocks and a 6-token tail block
SYSTEM = [[(i * 7919 + 31 * s) % 500 + 3 for i in range(150)] for s in range(3)]
QUESTION = [5, 6, 7, 8]
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, logprobs=1)


def logprobs_of(out) -> torch.Tensor:
    return torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])


def wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cold(tiny_ckpt):
    """The reference: each system prompt + the question, computed whole, no cache."""
    llm = LLM(tiny_ckpt, backend="local", enable_prefix_caching=False, **OPTIONS)
    outs = llm.generate([p + QUESTION for p in SYSTEM], PARAMS)
    llm.engine.shutdown()
    return [o.outputs[0] for o in outs]


def test_an_empty_cache_imports_a_prefix_exactly_and_survives_the_tier(
    tiny_ckpt, ray_session, cold
):
    ray = ray_session
    llm = LLM(tiny_ckpt, **TIER)
    link = llm.engine.kv.tier
    client = link.client
    llm.generate(SYSTEM, PARAMS)  # (each end-of-prompt checkpoint goes out a step later)
    wait_for(lambda: ray.get(client.actor.stats.remote())["entries"] >= 3 * 3, "the publishes")
    # a replica that never saw these prompts: nothing cached here (as after a stage loss)
    llm.engine.kv.clear()

    out = llm.generate([SYSTEM[0] + QUESTION], PARAMS)[0]
    assert out.num_cached_tokens == 150  # its whole system prompt, imported
    assert link.counters["tier_imports"] == 1 and link.counters["tier_imported_tokens"] == 150
    got, ref = out.outputs[0], cold[0]
    assert got.token_ids == ref.token_ids
    # fp32 on CPU: a state resumed at 150 and one prefill of 154 tokens differ only in the
    # order of sums (~1e-6)
    torch.testing.assert_close(logprobs_of(got), logprobs_of(ref), atol=1e-4, rtol=0)
    metrics = llm.engine.outputs.metrics.render(llm.engine.stats_local())
    assert "jamba_ray_prefix_tier_imports_total 1" in metrics

    # the tier dies between the lookup and the import: the import fails (its objects are lost
    # with their owner) or, where the object store still had them, succeeds; either way exact
    lookup = client.lookup

    def lookup_then_kill(*args):
        hit = lookup(*args)
        actor = ray.get_actor(client.name, namespace=NAMESPACE)
        ray.kill(actor)
        wait_for(lambda: _dead(ray, actor), "the tier to die")
        return hit

    client.lookup = lookup_then_kill
    out = llm.generate([SYSTEM[1] + QUESTION], PARAMS)[0]
    client.lookup = lookup
    assert out.outputs[0].token_ids == cold[1].token_ids
    torch.testing.assert_close(logprobs_of(out.outputs[0]), logprobs_of(cold[1]), atol=1e-4, rtol=0)
    imported = link.counters["tier_imports"] - 1
    assert imported + link.counters["tier_import_failures"] == 1
    assert out.num_cached_tokens == 150 * imported

    # with the tier gone, a lookup fails fast: the request is computed
    out = llm.generate([SYSTEM[2] + QUESTION], PARAMS)[0]
    assert out.outputs[0].token_ids == cold[2].token_ids and out.num_cached_tokens == 0
    assert link.counters["tier_lookups"] == 3 + 3  # (the publishing run looked up too)
    llm.engine.shutdown()


def _dead(ray, actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=5)
        return False
    except ray.exceptions.RayActorError:
        return True


def test_the_tier_outlives_the_placement_group_of_the_replica_that_started_it(ray_session):
    """A Serve replica runs in a placement group that captures what it starts; the tier must not
    be captured, or it dies when that replica stops (its group is removed)."""
    ray = ray_session
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from jamba_ray.runtime.prefix_tier import tier_actor

    name = "jamba-ray-prefix-tier-test-outlives"

    @ray.remote(num_cpus=0)
    class Replica:
        def start(self):
            tier = tier_actor(name, 2**20, 16)
            return ray.get(tier.stats.remote())["budget_bytes"]

    pg = placement_group([{"CPU": 0.01}])
    ray.get(pg.ready(), timeout=60)
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    replica = Replica.options(scheduling_strategy=strategy).remote()
    assert ray.get(replica.start.remote(), timeout=60) == 2**20
    remove_placement_group(pg)
    wait_for(lambda: _dead(ray, replica), "the replica to stop with its group")
    tier = ray.get_actor(name, namespace=NAMESPACE)
    try:
        assert ray.get(tier.stats.remote(), timeout=30)["budget_bytes"] == 2**20
    finally:
        ray.kill(tier)
