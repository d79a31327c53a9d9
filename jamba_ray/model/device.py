"""Which optional CUDA kernels a stage may use."""

from __future__ import annotations

import functools


@functools.cache
def decode_kernels():
    """(causal_conv1d_update, selective_state_update) from causal-conv1d / mamba-ssm, or None."""
    try:
        from causal_conv1d import causal_conv1d_update
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception:
        return None
    return causal_conv1d_update, selective_state_update
