"""Engine options that cannot run are refused when the config is built; CUDA kernels stay
optional."""

import pytest
import torch

from jamba_ray.config import EngineConfig
from jamba_ray.errors import ConfigError
from jamba_ray.model.kernels import packages


def test_float16_needs_a_gpu_stage():
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        EngineConfig.build("x", dtype="float16")
    assert EngineConfig.build("x", dtype="float16", num_gpus_per_stage=1).model.dtype == "float16"


def test_cuda_kernels_are_optional():
    # flash-attn / mamba-ssm / causal-conv1d are the `cuda` extra: absent here, or present but
    # never offered CPU tensors; the Triton kernels or the PyTorch paths run instead.
    assert set(packages.installed()) == {"flash-attn", "causal-conv1d", "mamba-ssm"}
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert packages.conv_update(x) is None and packages.ssm_update(x) is None
    assert packages.paged_decode(x, block_size=256) is None and packages.prefill(x) is None


def test_only_known_quantization_is_accepted():
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig.build("x", quantization="int4")


def test_decode_graphs_refuse_int8_weights():
    with pytest.raises(ConfigError, match="decode_graphs needs unquantized weights"):
        EngineConfig.build("x", quantization="int8", decode_graphs=True)


def test_an_unknown_option_is_refused_by_name():
    with pytest.raises(ConfigError, match="unknown engine option 'max_num_seq'"):
        EngineConfig.build("x", max_num_seq=4)


def test_micro_batch_size_defaults_by_the_stages_device_and_a_given_one_wins():
    assert EngineConfig.build("x").batched_tokens == 2048  # CPU stages
    assert EngineConfig.build("x", num_gpus_per_stage=1).batched_tokens == 8192
    assert (
        EngineConfig.build("x", num_gpus_per_stage=1, max_batched_tokens=300).batched_tokens == 300
    )
    with pytest.raises(ConfigError, match="max_batched_tokens must be at least 1"):
        EngineConfig.build("x", max_batched_tokens=0)


def test_stage_threads_default_to_the_cpus_the_pipeline_holds_on_a_node():
    from jamba_ray.runtime.stage_spec import default_threads

    assert default_threads(1.0, 2, "PACK") == 2  # packed: a stage alone uses both stages' cores
    assert default_threads(0.5, 2, "STRICT_PACK") == 1
    assert default_threads(0.75, 2, "PACK") == 2
    assert default_threads(1.0, 4, "SPREAD") == 1  # spread: only its own
    assert default_threads(0.25, 1, "PACK") == 1  # never below one
