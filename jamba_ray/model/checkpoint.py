"""Load only one stage's tensors from a checkpoint's safetensors shards (found by
`config/model_path.py`)."""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict

from ..config.model_path import Checkpoint

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$"
)


def slice_keys(
    names: list[str], start: int, end: int, first: bool, last: bool, tied: bool = False
) -> list[str]:
    """The tensor names stage [start, end) needs: its layers, plus embedding (first) and head
    (last)."""
    wanted = []
    for name in names:
        m = _LAYER.match(name)
        if m:
            keep = start <= int(m.group(1)) < end
        elif name == "model.embed_tokens.weight":
            keep = first or (last and tied)
        elif name in ("model.final_layernorm.weight", "lm_head.weight", "score.weight"):
            keep = last
        else:
            keep = False
        if keep:
            wanted.append(name)
    return wanted


def load_tensors(ckpt: Checkpoint, names: list[str], label: str = "weights") -> dict:
    """Read exactly `names`, opening each shard once; nothing else is read. Logs what it read
    (every LOG_EVERY_S seconds on long loads, and at the end), named by `label`."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = defaultdict(list)
    weight_map = ckpt.weight_map()
    for name in names:
        by_shard[weight_map[name]].append(name)
    tensors, read = {}, _ReadLog(label, len(names), len(by_shard))
    for shard, keys in sorted(by_shard.items()):
        with safe_open(ckpt.file(shard), framework="pt") as f:
            for key in keys:
                tensors[key] = f.get_tensor(key)
                read.add(tensors[key])
        read.shard_done()
    read.finish()
    return tensors


LOG_EVERY_S = 10.0


class _ReadLog:
    """Counts tensors and bytes as they are read; a log line on a timer and one at the end."""

    def __init__(self, label: str, tensors: int, shards: int):
        self.label, self.total, self.shards = label, tensors, shards
        self.tensors = self.bytes = self.shards_done = 0
        self.t0 = self.last = time.perf_counter()

    def add(self, t) -> None:
        self.tensors += 1
        self.bytes += t.numel() * t.element_size()
        if time.perf_counter() - self.last >= LOG_EVERY_S:
            self.last = time.perf_counter()
            log.info("%s: %s so far", self.label, self._counts())

    def shard_done(self) -> None:
        self.shards_done += 1

    def finish(self) -> None:
        log.info("%s: read %s in %.1f s", self.label, self._counts(), time.perf_counter() - self.t0)

    def _counts(self) -> str:
        return (
            f"{self.tensors}/{self.total} tensors, {self.bytes / 2**20:.1f} MiB, "
            f"{self.shards_done}/{self.shards} shards"
        )


def merge_experts(tensors: dict) -> dict:
    """Per-expert `experts.E.{gate,up,down}_proj.weight` -> `experts.gate_up_proj` [E, 2I, H] and
    `experts.down_proj` [E, H, I], as transformers stores them in memory. Merged input passes
    through."""
    import torch

    parts: dict[str, dict[int, dict[str, object]]] = defaultdict(lambda: defaultdict(dict))
    out = {}
    for name, t in tensors.items():
        m = _EXPERT.match(name)
        if m:
            parts[m.group(1)][int(m.group(2))][m.group(3)] = t
        else:
            out[name] = t
    for prefix, experts in parts.items():
        order = sorted(experts)
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate"], experts[e]["up"]], dim=0) for e in order]
        )
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down"] for e in order])
    return out


def load_slice(ckpt: Checkpoint, start: int, end: int, first: bool, last: bool, tied: bool = False):
    """(state dict in transformers' in-memory naming, the on-disk names that were read)."""
    names = slice_keys(list(ckpt.weight_map()), start, end, first, last, tied)
    return merge_experts(load_tensors(ckpt, names, f"stage layers [{start},{end})")), names
