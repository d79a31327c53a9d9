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
