"""Where a stage runs, and which optional CUDA kernels it may use."""

from __future__ import annotations

import functools

from ..errors import ConfigError


def select_device(num_gpus: float, cuda_available: bool, dtype: str) -> str:
    """'cuda' for a stage that reserves a GPU, else 'cpu'; refuse what cannot run."""
    if num_gpus > 0:
        if not cuda_available:
            raise ConfigError("this stage reserves a GPU (num_gpus > 0) but CUDA is not available here")
        return "cuda"
    if dtype in ("float16", "fp16"):
        raise ConfigError("float16 needs a GPU stage; use float32 or bfloat16 on CPU")
    return "cpu"


@functools.cache
def decode_kernels():
    """(causal_conv1d_update, selective_state_update) from causal-conv1d / mamba-ssm, or None."""
    try:
        from causal_conv1d import causal_conv1d_update
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception:
        return None
    return causal_conv1d_update, selective_state_update
