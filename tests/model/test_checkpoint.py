"""Loading one stage's tensors: only its slice is read, experts are merged like transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from jamba_ray.config.model_path import resolve
from jamba_ray.errors import ModelNotFoundError
from jamba_ray.model.checkpoint import load_slice, merge_experts, slice_keys


def test_slice_keys_pick_layers_and_the_ends():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.x",
        "model.layers.1.x",
        "model.layers.10.x",
        "model.final_layernorm.weight",
        "lm_head.weight",
    ]
    assert slice_keys(names, 0, 1, first=True, last=False) == [
        "model.embed_tokens.weight",
        "model.layers.0.x",
    ]
    assert slice_keys(names, 1, 11, first=False, last=True) == [
        "model.layers.1.x",
        "model.layers.10.x",
        "model.final_layernorm.weight",
        "lm_head.weight",
    ]


def test_per_expert_weights_merge_gate_then_up():
    g, u, d = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 3)
    p = "model.layers.1.feed_forward.experts"
    merged = merge_experts(
        {
            f"{p}.0.gate_proj.weight": g,
            f"{p}.0.up_proj.weight": u,
            f"{p}.0.down_proj.weight": d,
            f"{p}.1.gate_proj.weight": g + 1,
            f"{p}.1.up_proj.weight": u,
            f"{p}.1.down_proj.weight": d,
        }
    )
    assert merged[f"{p}.gate_up_proj"].shape == (2, 6, 4)
    assert torch.equal(merged[f"{p}.gate_up_proj"][1, :3], g + 1)
    assert torch.equal(merged[f"{p}.down_proj"][0], d)


def test_loader_reads_nothing_outside_its_slice(tiny_ckpt, monkeypatch):
    import safetensors

    read: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    tensors, names = load_slice(resolve(tiny_ckpt), 2, 4, first=False, last=False)
    assert read and sorted(read) == sorted(names)
    assert all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in read)
    assert "model.layers.3.feed_forward.experts.gate_up_proj" in tensors


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such checkpoint"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="reachable hub id"):
        resolve("nobody/not-a-model")  # HF_HUB_OFFLINE=1 in tests


def write_merged_copy(src: str, dst) -> None:
    """The same weights with experts stored merged (`gate_up_proj`), in one file."""
    import shutil
    from pathlib import Path

    dst = Path(dst)
    dst.mkdir()
    tensors = {}
    for shard in sorted(
        set(
            json.loads((Path(src) / "model.safetensors.index.json").read_text())[
                "weight_map"
            ].values()
        )
    ):
        tensors.update(load_file(Path(src) / shard))
    save_file(
        {k: v.contiguous() for k, v in merge_experts(tensors).items()}, dst / "model.safetensors"
    )
    for f in Path(src).iterdir():
        if f.suffix in (".json", ".jinja") and not f.name.startswith("model."):
            shutil.copy(f, dst / f.name)
