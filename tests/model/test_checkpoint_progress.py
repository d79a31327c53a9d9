"""Loading a stage's slice says what it read: tensors, bytes and shards, named by the slice."""

from __future__ import annotations

import logging

from jamba_ray.config.model_path import resolve
from jamba_ray.model import checkpoint
from jamba_ray.model.checkpoint import load_slice


def test_loading_a_slice_logs_tensors_bytes_and_shards(tiny_ckpt, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="jamba_ray.model.checkpoint")
    tensors, names = load_slice(resolve(tiny_ckpt), 0, 3, first=True, last=False)
    done = [r.getMessage() for r in caplog.records if "read" in r.getMessage()]
    mib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    assert len(done) == 1 and done[0].startswith("stage layers [0,3): read ")
    assert f"{len(names)}/{len(names)} tensors, {mib:.1f} MiB" in done[0]

    caplog.clear()
    monkeypatch.setattr(checkpoint, "LOG_EVERY_S", 0.0)  # a long load: a line as it goes
    load_slice(resolve(tiny_ckpt), 3, 6, first=False, last=True)
    assert sum("so far" in r.getMessage() for r in caplog.records) >= 1
