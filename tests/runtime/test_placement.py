"""Stage reservations fit the cluster there is, or are refused at once, naming the shortfall."""

import pytest

from jamba_ray.config.engine_config import PlacementConfig
from jamba_ray.errors import ConfigError
from jamba_ray.runtime.placement import require_feasible, stage_bundle


def test_without_a_cpu_count_each_stage_takes_an_equal_share_of_the_free_cpus(ray_session):
    total = ray_session.cluster_resources()["CPU"]
    bundle = stage_bundle(PlacementConfig(num_stages=4), 4)  # (what is free varies as tests run)
    assert 0 < bundle["CPU"] <= 1.0 and 4 * bundle["CPU"] <= total and "GPU" not in bundle
    assert stage_bundle(PlacementConfig(num_cpus_per_stage=0.25), 4)["CPU"] == 0.25


def test_a_layout_larger_than_the_cluster_is_refused_at_once(ray_session):
    total = ray_session.cluster_resources()["CPU"]
    with pytest.raises(ConfigError, match=rf"100 stages need 100 CPU .* has {total:g} usable"):
        require_feasible({"CPU": 1.0}, 100, "PACK")
    with pytest.raises(ConfigError, match="2 stages need 2 GPU"):
        require_feasible({"CPU": 0.1, "GPU": 1.0}, 2, "PACK")
    with pytest.raises(ConfigError, match="on 2 different nodes"):
        require_feasible({"CPU": 0.1}, 2, "STRICT_SPREAD")  # one node here
    require_feasible({"CPU": 0.25}, 4, "STRICT_PACK")  # fits: no error
