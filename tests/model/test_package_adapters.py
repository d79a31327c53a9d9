"""Adapters to flash-attn, causal-conv1d and mamba-ssm (`model/kernels/packages.py`), on the CPU.

The packages are CUDA-only and not installed here, so each is replaced by a stand-in module that
does what the package documents, in plain torch, and refuses what it refuses (int32 indices, a
[num_blocks, block_size, kv_heads, head_dim] paged cache with blocks divisible by 256, a 2-D conv
weight). With them the adapters must pass the same self-checks the GPU runs and be the ones chosen.
This checks our argument plumbing against our reading of the packages' documentation; the
packages themselves are checked only on a GPU (their self-checks there, and gpu_check.py).
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from jamba_ray.model import kernels
from jamba_ray.model.kernels import packages, selfcheck


def causal_conv1d_update(
    x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None
):
    """x (batch, dim); conv_state (cache, dim, state_len) at conv_state_indices; weight (dim, w)."""
    assert weight.dim() == 2 and conv_state_indices.dtype == torch.int32
    assert activation in (None, "silu", "swish") and cache_seqlens is None
    idx = conv_state_indices.long()
    new = torch.cat([conv_state[idx], x[:, :, None].to(conv_state.dtype)], dim=-1)
    conv_state[idx] = new[:, :, -conv_state.shape[-1] :]
    out = (new[:, :, -weight.shape[1] :].float() * weight.float()).sum(-1)
    out = out + bias.float() if bias is not None else out
    return (F.silu(out) if activation else out).to(x.dtype)


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None
):
    """state (cache, dim, dstate) at state_batch_indices; x, dt, z (batch, dim); B, C (batch, n)."""
    assert state_batch_indices.dtype == torch.int32 and dt_bias is None and not dt_softplus
    idx = state_batch_indices.long()
    s = state[idx] * torch.exp(dt[:, :, None] * A) + dt[:, :, None] * B[:, None] * x[:, :, None]
    state[idx] = s
    out = (s * C[:, None]).sum(-1) + (x * D if D is not None else 0)
    return (out * F.silu(z) if z is not None else out).to(x.dtype)


def flash_attn_with_kvcache(
    q, k_cache, v_cache, cache_seqlens=None, block_table=None, softmax_scale=None, causal=False
):
    """q (batch, 1, nheads, hd); caches (num_blocks, block_size, kv_heads, hd), paged."""
    assert k_cache.shape[1] % 256 == 0 and k_cache.stride(-1) == 1
    assert cache_seqlens.dtype == block_table.dtype == torch.int32
    out = torch.empty_like(q)
    for b, n in enumerate(cache_seqlens.tolist()):
        blocks = block_table[b].long()
        keys = k_cache[blocks].flatten(0, 1)[:n].transpose(0, 1)  # (kv_heads, n, hd)
        values = v_cache[blocks].flatten(0, 1)[:n].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[b].transpose(0, 1), keys, values, scale=softmax_scale, enable_gqa=True
        )  # (nheads, 1, hd)
        out[b] = o.transpose(0, 1)
    return out


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal
):
    """Causal aligned to the bottom right: query i of n sees keys j <= i + m - n."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and causal
    out, bq, bk = torch.empty_like(q), cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for g in range(len(bq) - 1):
        qs, ks = q[bq[g] : bq[g + 1]], slice(bk[g], bk[g + 1])
        n, m = len(qs), bk[g + 1] - bk[g]
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1),
            attn_mask=mask, scale=softmax_scale, enable_gqa=True,
        )  # fmt: skip
        out[bq[g] : bq[g + 1]] = o.transpose(0, 1)
    return out


MODULES = {
    "causal_conv1d": {"causal_conv1d_update": causal_conv1d_update},
    "mamba_ssm": {},
    "mamba_ssm.ops": {},
    "mamba_ssm.ops.triton": {},
    "mamba_ssm.ops.triton.selective_state_update": {
        "selective_state_update": selective_state_update
    },
    "flash_attn": {
        "flash_attn_with_kvcache": flash_attn_with_kvcache,
        "flash_attn_varlen_func": flash_attn_varlen_func,
    },
}


@pytest.fixture
def stand_ins(monkeypatch):
    for name, attrs in MODULES.items():
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        for attr, fn in attrs.items():
            setattr(sys.modules[name], attr, fn)
    monkeypatch.setattr(packages, "on_gpu", lambda t: True)
    packages._import.cache_clear()
    selfcheck.reset()
    yield
    packages._import.cache_clear()
    selfcheck.reset()


def test_each_package_adapter_passes_its_self_check_and_is_chosen(stand_ins):
    bf16, f32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert packages.installed() == {"flash-attn": True, "causal-conv1d": True, "mamba-ssm": True}
    got = {
        "conv_update": kernels.choose("conv_update", bf16),
        "ssm_update": kernels.choose("ssm_update", f32),
        "paged_decode": kernels.choose("paged_decode", bf16, block_size=256),
        "prefill": kernels.choose("prefill", bf16),
    }
    assert {op: c and c[0] for op, c in got.items()} == {
        "conv_update": "causal_conv1d_update",
        "ssm_update": "selective_state_update",
        "paged_decode": "flash_attn_with_kvcache",
        "prefill": "flash_attn_varlen_func",
    }
    assert set(selfcheck.stats()["kernel_fallbacks"].values()) == {0}
    # FlashAttention-2's paged cache needs 256-token blocks, and fp16/bf16: ours runs otherwise
    assert packages.paged_decode(bf16, block_size=16) is None
    assert packages.paged_decode(f32, block_size=256) is None and packages.prefill(f32) is None


def test_a_package_too_old_to_index_states_by_slot_counts_as_absent(stand_ins, monkeypatch):
    def no_indices(x, conv_state, weight, bias=None, activation=None):
        raise AssertionError("never called: it cannot address the pool by slot")

    monkeypatch.setattr(sys.modules["causal_conv1d"], "causal_conv1d_update", no_indices)
    packages._import.cache_clear()
    assert packages.conv_update(torch.zeros(1)) is None
