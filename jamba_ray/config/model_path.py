"""Where a checkpoint lives: a local directory, or a hub id whose metadata is fetched here.

Pure Python (the hub client only when a hub id is given): the engine reads the config, tokenizer
and weight map through it before any stage starts; the stages read their shards
(`model/checkpoint.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
METADATA = ["*.json", "*.jinja", "tokenizer*"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A local directory holding config + tokenizer; shards may still be on the hub (`repo_id`)."""

    root: Path
    repo_id: str | None = None

    def file(self, name: str) -> Path:
        path = self.root / name
        if path.exists() or self.repo_id is None:
            return path
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo_id, name))

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, from the index (or the single-file checkpoint)."""
        index = self.root / INDEX
        if index.exists():
            return json.loads(index.read_text())["weight_map"]
        from safetensors import safe_open

        with safe_open(self.file(SINGLE), framework="pt") as f:
            return {k: SINGLE for k in f.keys()}


def resolve(model: str | Path) -> Checkpoint:
    """A local checkpoint directory, or a hub id whose metadata is fetched (shards are per
    stage)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint")
        return Checkpoint(path)
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise ModelNotFoundError(f"model {str(model)!r}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(str(model), allow_patterns=METADATA)
    except Exception as e:  # offline, unknown repo, no network: all mean "not found" here
        raise ModelNotFoundError(
            f"model {str(model)!r} is neither a local directory nor a reachable hub id "
            f"({type(e).__name__})"
        ) from None
    return Checkpoint(Path(root), repo_id=str(model))
