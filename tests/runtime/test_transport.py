"""Hidden states between stages: which transport a pipeline picks, and the p2p link's contract."""

import pytest
import ray
import torch

from jamba_ray.errors import ConfigError
from jamba_ray.runtime.transport import PeerLink, choose, free_address
from tests.conftest import STAGE_CPUS


def test_auto_is_the_compiled_graph_between_gpu_stages_and_per_task_on_cpus_or_one_stage():
    assert choose("auto", 4, "cuda", gpus_per_stage=1) == "compiled"  # NCCL inside the graph
    assert choose("auto", 4, "cpu") == "object_store"  # idle graph stages spin on shared cores
    assert choose("auto", 4, "cuda", gpus_per_stage=0.5) == "compiled"  # shared memory then
    assert choose("auto", 1, "cpu") == "object_store"
    assert choose("compiled", 1, "cpu") == "compiled"  # named: a graph of one stage
    assert choose("p2p", 2, "cpu") == "p2p"  # gloo: how CI checks the p2p path
    assert choose("object_store", 4, "cuda", gpus_per_stage=1) == "object_store"
    assert choose("p2p", 1, "cuda", gpus_per_stage=1) == "object_store"  # one stage sends nothing
    # the prefix tier's imports queue behind the steps in flight only per task
    assert choose("auto", 4, "cuda", gpus_per_stage=1, per_task=True) == "object_store"


def test_the_prefix_tier_with_a_compiled_graph_is_refused_by_name():
    from jamba_ray.config import EngineConfig

    with pytest.raises(ConfigError, match="prefix_tier needs a per-task transport"):
        EngineConfig.build("m", prefix_tier=True, transport="compiled")
    assert EngineConfig.build("m", prefix_tier=True).compute.transport == "auto"


def test_unknown_transport_and_nccl_on_a_shared_gpu_are_config_errors():
    with pytest.raises(ConfigError, match="transport must be one of"):
        choose("rdma", 2, "cpu")
    with pytest.raises(ConfigError, match="whole GPU per stage"):
        choose("p2p", 2, "cuda", gpus_per_stage=0.5)


@ray.remote(num_cpus=STAGE_CPUS)
class Peer:
    def __init__(self, rank: int):
        self.rank = rank

    def address(self) -> str:
        return free_address("127.0.0.1")

    def join(self, address: str) -> None:
        self.link = PeerLink(self.rank, 2, address, "cpu", timeout_s=60)

    def send(self, rows: int, dtype: str):
        return self.link.send(
            torch.arange(rows * 8, dtype=torch.float32).view(rows, 8).to(getattr(torch, dtype))
        )

    def recv(self, handoff):
        return self.link.recv(handoff).float().numpy()

    def close(self) -> None:
        self.link.close()


def test_p2p_link_delivers_in_order_and_a_lost_message_fails_loudly(ray_session):
    a, b = Peer.remote(0), Peer.remote(1)
    try:
        address = ray.get(a.address.remote())
        ray.get([a.join.remote(address), b.join.remote(address)], timeout=120)
        for rows, dtype in [(1, "float32"), (3, "bfloat16")]:
            h = ray.get(a.send.remote(rows, dtype))
            assert h.shape == (rows, 8) and h.dtype == dtype
            got = ray.get(b.recv.remote(h), timeout=60)
            assert got.tolist() == torch.arange(rows * 8).view(rows, 8).float().tolist()
        ray.get(a.send.remote(1, "float32"))  # never received
        after = ray.get(a.send.remote(1, "float32"))
        with pytest.raises(ray.exceptions.RayTaskError, match="expected transfer #2 .* got #3"):
            ray.get(b.recv.remote(after), timeout=60)
        ray.get([a.close.remote(), b.close.remote()], timeout=60)
    finally:
        ray.kill(a)
        ray.kill(b)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL p2p between stages needs 2 NVIDIA GPUs"
)
def test_nccl_link_between_two_gpu_stages(tiny_ckpt, ray_session):
    from jamba_ray.config import ModelSpec
    from jamba_ray.config.planner import plan
    from tests.runtime.test_pipeline import greedy, pipeline

    plans = plan(ModelSpec.from_path(tiny_ckpt), 2)
    pipe = pipeline(tiny_ckpt, plans, 2, 64, num_gpus_per_stage=1)
    try:
        assert pipe.transport == "p2p"  # auto between GPU stages
        tokens, _ = greedy(pipe, [[1, 5, 9, 200]], 4)
        assert len(tokens[0]) == 4 and {s["transport"] for s in pipe.stats()} == {"p2p/nccl"}
    finally:
        pipe.shutdown()
