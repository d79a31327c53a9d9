"""Device selection: GPU stages only where CUDA is, fp16 only on GPUs, CPU by default."""

import pytest

from jamba_ray.config import EngineConfig
from jamba_ray.errors import ConfigError
from jamba_ray.model.device import decode_kernels, select_device


def test_cpu_is_the_default_and_gpu_stages_need_cuda():
    assert select_device(0, cuda_available=False, dtype="float32") == "cpu"
    assert select_device(0, cuda_available=False, dtype="bfloat16") == "cpu"
    assert select_device(1, cuda_available=True, dtype="bfloat16") == "cuda"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        select_device(1, cuda_available=False, dtype="bfloat16")
    with pytest.raises(ConfigError, match="float16 needs a GPU"):
        select_device(0, cuda_available=False, dtype="float16")


def test_cuda_kernels_are_optional():
    # mamba-ssm / causal-conv1d are the `cuda` extra: absent here, the PyTorch path runs instead.
    assert decode_kernels() is None or len(decode_kernels()) == 2


def test_only_known_quantization_is_accepted():
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(model="x", quantization="int4")


def test_decode_graphs_refuse_int8_weights():
    with pytest.raises(ConfigError, match="decode_graphs needs unquantized weights"):
        EngineConfig(model="x", quantization="int8", decode_graphs=True)
