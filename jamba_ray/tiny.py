"""Tiny random Jamba checkpoints in the hub's on-disk format, with a tokenizer built offline."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

SPECIAL_TOKENS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>"]  # ids 0, 1, 2 as in Jamba

# Tools and assistant tool calls render in Jamba's own format (what vLLM's `jamba` parser reads).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message.get('tool_calls') %}<tool_calls>[{% for call in message['tool_calls'] %}"
    "{% if not loop.first %}, {% endif %}{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}{% endfor %}]</tool_calls>"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

PRESETS: dict[str, dict[str, Any]] = {
    # ~1M params: every layer kind (attention, Mamba, dense MLP, MoE) in 6 layers, for tests.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=3,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        max_position_embeddings=2048,
        initializer_range=0.1,
    ),
    # ~48M params, shaped like the CPU baseline in the design notes, for benchmarks.
    "small": dict(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=8,
        attn_layer_offset=4,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
        max_position_embeddings=4096,
    ),
}


@dataclass(frozen=True, slots=True)
class TinySpec:
    preset: str = "tiny"
    seed: int = 0
    max_shard_size: str = "200KB"
    classifier_labels: int = 0
    overrides: tuple[tuple[str, Any], ...] = ()

    def config_kwargs(self) -> dict[str, Any]:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        kwargs = {**PRESETS[self.preset], **dict(self.overrides)}
        kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        if self.classifier_labels:
            kwargs["num_labels"] = self.classifier_labels
        return kwargs


def corpus_text() -> str:
    return resources.files("jamba_ray.assets").joinpath("corpus.txt").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the shipped corpus, padded with reserved tokens to
    `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - tok.get_vocab_size())]
    tok.add_special_tokens(reserved)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def init_tiny(
    out_dir: str | Path, spec: TinySpec = TinySpec(), say: Callable[[str], None] | None = None
) -> Path:
    """Write a random Jamba checkpoint (config, sharded safetensors + index, tokenizer) to
    `out_dir`; `say` hears each step."""
    import torch
    from transformers import JambaConfig, JambaForCausalLM, JambaForSequenceClassification

    say = say or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = JambaConfig(**spec.config_kwargs())
    torch.manual_seed(spec.seed)
    cls = JambaForSequenceClassification if spec.classifier_labels else JambaForCausalLM
    say(f"random {spec.preset} Jamba weights ({config.num_hidden_layers} layers, seed {spec.seed})")
    model = cls(config).eval()
    if spec.classifier_labels:
        _add_lm_head(model, config)
    params = sum(p.numel() for p in model.parameters())
    say(f"writing {params:,} parameters as safetensors shards of at most {spec.max_shard_size}")
    with _no_progress_bars():  # transformers draws a bar over the shards: noise in logs
        model.save_pretrained(out, max_shard_size=spec.max_shard_size)
    say(f"training a byte-level BPE tokenizer ({config.vocab_size} tokens) on the shipped corpus")
    build_tokenizer(config.vocab_size).save_pretrained(out)
    (out / "jamba_ray_tiny.json").write_text(json.dumps({"preset": spec.preset, "seed": spec.seed}))
    return out


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _add_lm_head(model, config) -> None:
    """A classifier checkpoint also carries an lm_head, so the same files serve generation."""
    import torch

    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    torch.nn.init.normal_(head.weight, std=config.initializer_range)
    model.register_module("lm_head", head)


def default_tiny_dir() -> Path:
    """Where `serve`/`generate` without `--model` keep the auto-created tiny checkpoint."""
    import os

    root = Path(os.environ.get("JAMBA_RAY_CACHE", Path.home() / ".cache" / "jamba-ray"))
    return root / "tiny-default"


def ensure_default_tiny() -> Path:
    path = default_tiny_dir()
    if not (path / "model.safetensors.index.json").exists():
        init_tiny(path, TinySpec())
    return path
