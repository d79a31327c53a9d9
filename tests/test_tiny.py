"""Tiny checkpoints are real HF-format Jamba checkpoints with an offline-built tokenizer."""

import json
from pathlib import Path

from transformers import AutoTokenizer, JambaConfig

from jamba_ray.config import ModelSpec
from jamba_ray.config.planner import total_params


def test_checkpoint_is_sharded_in_hub_naming(tiny_ckpt):
    index = json.loads((Path(tiny_ckpt) / "model.safetensors.index.json").read_text())
    names = index["weight_map"]
    assert len(set(names.values())) > 1, "expected several shards"
    assert "model.layers.1.feed_forward.experts.0.gate_proj.weight" in names
    assert "model.layers.1.feed_forward.router.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    assert JambaConfig.from_pretrained(tiny_ckpt).model_type == "jamba"


def test_every_layer_kind_is_present(tiny_ckpt):
    spec = ModelSpec.from_path(tiny_ckpt)
    codes = {spec.layer_code(i) for i in range(spec.num_hidden_layers)}
    assert codes == {"A/MLP", "A/MoE", "M/MLP", "M/MoE"}
    assert 0.4e6 < total_params(spec) < 2e6


def test_tokenizer_round_trips_and_has_a_chat_template(tiny_ckpt):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    ids = tok("hello café 東京").input_ids
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == "hello café 東京"
    assert len(tok) == ModelSpec.from_path(tiny_ckpt).vocab_size
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in chat and chat.endswith("<|assistant|>")


def test_init_tiny_cli_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from jamba_ray.cli import main

    for d in ("a", "b"):
        assert main(["init-tiny", str(tmp_path / d), "--seed", "7"]) == 0
    first = load_file(next((tmp_path / "a").glob("*00001-*.safetensors")))
    second = load_file(next((tmp_path / "b").glob("*00001-*.safetensors")))
    assert all((first[k] == second[k]).all() for k in first)
