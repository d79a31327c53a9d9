"""The stage's nn.Module: embedding (first stage), decoder layers [start, end), norm + head (last).

Built from transformers' Jamba layer modules so weight names and numerics match the reference;
parameter names equal the checkpoint's (`model.layers.N....`), so a slice loads with strict=True.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import JambaConfig
from transformers.models.jamba.modeling_jamba import (
    JambaAttentionDecoderLayer,
    JambaMambaDecoderLayer,
    JambaRMSNorm,
)

from ..engine.messages import StepMessage
from .attention import attend
from .layout import Layout
from .mamba import mamba_mix
from .state_pool import PoolShape, StatePool


class SliceModel(nn.Module):
    def __init__(
        self,
        config: JambaConfig,
        start: int,
        end: int,
        first: bool,
        last: bool,
        num_labels: int = 0,
    ):
        super().__init__()
        self.start, self.end, self.first, self.last = start, end, first, last
        self.model = nn.Module()
        if first:
            self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers = {}
        for i in range(start, end):
            kind = config.layers_block_type[i]
            cls = JambaAttentionDecoderLayer if kind == "attention" else JambaMambaDecoderLayer
            layers[str(i)] = cls(config, layer_idx=i)
        self.model.layers = nn.ModuleDict(layers)
        if last:
            self.model.final_layernorm = JambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if (
                num_labels
            ):  # as JambaForSequenceClassification: score(final_norm(h)) at the last token
                self.score = nn.Linear(config.hidden_size, num_labels, bias=False)
        # Each layer's index into the pool's Mamba or attention stacks.
        self.pool_index: dict[str, int] = {}
        counts = {"attention": 0, "mamba": 0}
        for i in range(start, end):
            kind = config.layers_block_type[i]
            self.pool_index[str(i)] = counts[kind]
            counts[kind] += 1
        self.n_mamba, self.n_attn = counts["mamba"], counts["attention"]

    def pool_shape(self, config: JambaConfig, sizes) -> PoolShape:
        """`sizes`: slots, blocks, block_size, checkpoints and max_len (a StageSpec)."""
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return PoolShape(
            n_mamba=self.n_mamba,
            n_attn=self.n_attn,
            slots=sizes.slots,
            blocks=sizes.blocks,
            block_size=sizes.block_size,
            checkpoints=sizes.checkpoints,
            max_len=sizes.max_len,
            d_inner=config.mamba_expand * config.hidden_size,
            d_conv=config.mamba_d_conv,
            d_state=config.mamba_d_state,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
        )

    def forward(self, msg: StepMessage, x: torch.Tensor, pool: StatePool, tables: dict):
        """Token ids [T] (first stage) or hidden [T, H] -> hidden [T, H]; the last stage returns
        logits [R, V], or {"logits", "scores" [C, K]} when rows ask for the classification head.
        `tables`: each sequence's KV block table."""
        lay = Layout.build(msg, tables, pool.shape.block_size, device=x.device)
        return self.run(lay, x, pool)

    def run(self, lay: Layout, x: torch.Tensor, pool: StatePool):
        """The forward on a prepared layout (the decode graphs pass a fixed-shape one)."""
        h = self.model.embed_tokens(x) if self.first else x  # [T, H]
        for name, layer in self.model.layers.items():
            j = self.pool_index[name]
            normed = layer.input_layernorm(h)
            if isinstance(layer, JambaMambaDecoderLayer):
                ckpt = (pool.ckpt_conv[j], pool.ckpt_ssm[j])
                mixed = mamba_mix(layer.mamba, normed, lay, pool.conv[j], pool.ssm[j], *ckpt)
            else:
                mixed = attend(layer.self_attn, normed, lay, pool.k[j], pool.v[j])
            h = h + mixed
            h = h + layer.feed_forward(layer.pre_ff_layernorm(h)[None])[0]
        if not self.last:
            return h
        logits = self.lm_head(self.model.final_layernorm(h[lay.logit_rows])).float()  # [R, V]
        if not len(lay.score_rows):
            return logits
        if not hasattr(self, "score"):
            raise ValueError("this checkpoint has no classification head (score.weight)")
        scores = self.score(self.model.final_layernorm(h[lay.score_rows])).float()  # [C, K]
        return {"logits": logits, "scores": scores}
