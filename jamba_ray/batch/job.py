"""Batch scoring as a Ray Data job: read -> map_batches over pipeline actors -> Parquet parts."""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ray.data import ActorPoolStrategy

from ..errors import InvalidRequestError
from ..model.checkpoint import resolve
from .scorer import PipelineScorer, ScoreConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class JobSummary:
    rows: int = 0
    skipped: int = 0  # already in the output from an earlier run
    tokens: int = 0
    errors: int = 0
    wall_s: float = 0.0
    parts: int = 0

    def line(self) -> str:
        rate = self.rows / self.wall_s if self.wall_s else 0.0
        tps = self.tokens / self.wall_s if self.wall_s else 0.0
        return (
            f"rows {self.rows} (+{self.skipped} done before), tokens {self.tokens}, "
            f"errors {self.errors}, "
            f"wall {self.wall_s:.1f}s, {rate:.1f} rows/s, {tps:.0f} tokens/s"
        )


def read_input(path: str):
    import ray.data

    p = str(path)
    if p.endswith((".jsonl", ".json", ".jsonl.gz")):
        return ray.data.read_json(p)
    return ray.data.read_parquet(p)


def score(data, config: ScoreConfig, pipelines: int = 1, batch_size: int = 16, skip_ids=None):
    """A lazy Ray Dataset: every input column plus the task's output columns.

    `data` is a path (JSONL or Parquet, any filesystem Ray Data reads) or a Ray Dataset; rows whose
    id is in `skip_ids` are left out (resume).
    """
    if config.task == "classify" and "score.weight" not in resolve(config.model).weight_map():
        raise InvalidRequestError(
            "task 'classify' needs a checkpoint with a classification head (score.weight)"
        )
    ds = read_input(data) if isinstance(data, (str, Path)) else data
    if skip_ids:
        done, col = frozenset(skip_ids), config.id_column
        ds = ds.filter(lambda row: row[col] not in done)
    return ds.map_batches(
        PipelineScorer,
        fn_constructor_kwargs={"config": config},
        batch_size=batch_size,
        batch_format="pandas",
        compute=ActorPoolStrategy(size=pipelines),
        num_cpus=0.25,
    )


def done_ids(out_dir: Path, id_column: str) -> set:
    """Ids already written by earlier runs; unreadable (half-written) parts are removed."""
    import pyarrow.parquet as pq

    ids: set = set()
    for part in sorted(out_dir.glob("part-*.parquet")):
        try:
            ids.update(pq.read_table(part, columns=[id_column]).column(0).to_pylist())
        except Exception:
            log.warning("removing unreadable part %s", part)
            part.unlink()
    return ids


def run_job(
    input_path: str,
    output: str,
    config: ScoreConfig,
    pipelines: int = 1,
    batch_size: int = 16,
    progress: bool = True,
) -> JobSummary:
    """Score `input_path` into Parquet parts under `output`; a rerun skips rows already written."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    ds_in = read_input(input_path)
    resumable = config.id_column in ds_in.schema().names
    skip = done_ids(out, config.id_column) if resumable else set()
    if not resumable:
        log.warning(
            "input has no %r column: the job cannot resume, it rescores every row", config.id_column
        )
    summary = JobSummary(skipped=len(skip))
    total = ds_in.count() - len(skip)
    t0 = time.perf_counter()
    for batch in score(ds_in, config, pipelines, batch_size, skip).iter_batches(
        batch_size=None, batch_format="pandas"
    ):
        _write_part(out, batch)
        summary.parts += 1
        summary.rows += len(batch)
        summary.tokens += int(batch["num_tokens"].fillna(0).sum())
        summary.errors += int(batch["error"].notna().sum())
        summary.wall_s = time.perf_counter() - t0
        if progress:
            print(
                f"\r[{summary.rows}/{total}] {summary.line()}", end="", file=sys.stderr, flush=True
            )
    summary.wall_s = time.perf_counter() - t0
    if progress:
        print(file=sys.stderr)
    return summary


def _write_part(out: Path, batch) -> None:
    """Write then rename, so a killed job never leaves a half-written part behind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"part-{uuid.uuid4().hex}.parquet"
    tmp = out / f".{name}.tmp"
    table = pa.Table.from_pandas(batch, preserve_index=False)
    pq.write_table(table.replace_schema_metadata(None), tmp)  # plain Arrow types, no pandas dtypes
    os.replace(tmp, out / name)
