"""What the batch tests share: texts, a JSONL writer, the job settings for 2 cores, part reading."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from jamba_ray.batch import ScoreConfig
from tests.conftest import STAGE_CPUS

TEXTS = [
    "hello world, the quick brown fox",
    "Ray starts the stage actors inside a placement group.",
    "café 東京 🙂",
    "A state space model reads a sequence one token at a time. " * 6,  # long: chunked prefill
]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(model, **kw) -> ScoreConfig:
    base = dict(
        num_stages=2,
        num_cpus_per_stage=STAGE_CPUS,
        max_batched_tokens=16,
        max_num_seqs=8,
        max_model_len=256,
    )
    return ScoreConfig.build(model, **{**base, **kw})


def read_parts(out: Path) -> pd.DataFrame:
    return pd.concat(
        [pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))], ignore_index=True
    )
