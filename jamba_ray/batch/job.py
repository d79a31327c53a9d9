"""Batch scoring as a Ray Data job: read -> map_batches over pipeline actors -> Parquet parts.

`prepare_job` needs no Ray: it checks the task and the input and reads what earlier runs wrote,
so a bad job fails, and a finished one returns, before any actor starts. `execute` runs the rest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ray.data import ActorPoolStrategy

from ..errors import InvalidRequestError
from . import parts
from .preflight import check_task, input_format, inspect_input
from .progress import Progress
from .score_config import BATCH_SIZE, ScoreConfig
from .scorer import PipelineScorer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class JobSummary:
    rows: int = 0
    skipped: int = 0  # already in the output from an earlier run
    retried: int = 0  # error rows of earlier runs scored again
    tokens: int = 0
    errors: int = 0
    wall_s: float = 0.0
    parts: int = 0

    def line(self) -> str:
        rate = self.rows / self.wall_s if self.wall_s else 0.0
        tps = self.tokens / self.wall_s if self.wall_s else 0.0
        return (
            f"rows {self.rows} (+{self.skipped} done before, {self.retried} retried), "
            f"tokens {self.tokens}, errors {self.errors}, "
            f"wall {self.wall_s:.1f}s, {rate:.1f} rows/s, {tps:.0f} tokens/s"
        )


@dataclass(frozen=True, slots=True)
class Job:
    input: str
    output: Path
    config: ScoreConfig
    pending: int  # rows left to score
    skip: frozenset  # ids not scored again
    skipped: int  # input rows whose id is in `skip`
    retry: dict  # id -> parts holding that id's error rows, for ids scored again

    def line(self) -> str:
        return (
            f"jamba-ray score: {self.pending} rows to score ({self.skipped} done before, "
            f"{len(self.retry)} error rows to retry)"
        )


def read_input(path: str):
    import ray.data

    if input_format(path) == "json":
        return ray.data.read_json(str(path))
    return ray.data.read_parquet(str(path))


def score(
    data, config: ScoreConfig, pipelines: int = 1, batch_size: int = BATCH_SIZE, skip_ids=None
):
    """A lazy Ray Dataset: every input column plus the task's output columns.

    `data` is a path (JSONL or Parquet, any filesystem Ray Data reads) or a Ray Dataset; rows whose
    id is in `skip_ids` are left out (resume).
    """
    check_task(config)
    ds = read_input(data) if isinstance(data, (str, Path)) else data
    if skip_ids:
        from ray.data.expressions import col

        ds = ds.filter(expr=col(config.id_column).not_in(list(skip_ids)))
    # One batch per block: a small input read as one block would otherwise be one task, on one
    # pipeline however many there are. Streaming, so a large input is not held in memory.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    return ds.map_batches(
        PipelineScorer,
        fn_constructor_kwargs={"config": config},
        batch_size=batch_size,
        batch_format="pandas",
        compute=ActorPoolStrategy(size=pipelines),
        num_cpus=0.25,
    )


def prepare_job(input_path: str, output: str, config: ScoreConfig, retry_errors: bool = True):
    """Check the job and read the output of earlier runs; no Ray needed."""
    check_task(config)
    info = inspect_input(input_path, config.text_column, config.id_column)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if info.ids is None:
        if parts.list_parts(out):
            raise InvalidRequestError(
                f"{out} holds parts of an earlier run but the input has no "
                f"{config.id_column!r} column to resume by: a rerun would score every row again; "
                "give --id-column or a new --output"
            )
        log.warning("input has no %r column: the job cannot resume", config.id_column)
        return Job(str(input_path), out, config, info.rows, frozenset(), 0, {})
    state = parts.read_state(out, config.id_column)
    wanted = set(info.ids)
    retry = {i: p for i, p in state.failed.items() if i in wanted} if retry_errors else {}
    skip = frozenset(state.done | (state.failed.keys() - retry.keys()))
    skipped = sum(1 for i in info.ids if i in skip)
    return Job(str(input_path), out, config, info.rows - skipped, skip, skipped, retry)


def execute(
    job: Job, pipelines: int = 1, batch_size: int = BATCH_SIZE, progress_every: float | None = 10.0
) -> JobSummary:
    """Score the pending rows of `job` into new parts; nothing starts when none are pending."""
    summary = JobSummary(skipped=job.skipped, retried=len(job.retry))
    if not job.pending:
        return summary
    t0 = time.perf_counter()
    ds = score(read_input(job.input), job.config, pipelines, batch_size, job.skip)
    with Progress(job.pending, progress_every) as progress:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            parts.write_part(job.output, batch)
            _supersede(job, batch)
            tokens = int(batch["num_tokens"].fillna(0).sum())
            progress.add(len(batch), tokens, int(batch["error"].notna().sum()))
            summary.parts += 1
    c = progress.counts
    summary.rows, summary.tokens, summary.errors = c.rows, c.tokens, c.errors
    summary.wall_s = time.perf_counter() - t0
    return summary


def _supersede(job: Job, batch) -> None:
    """The error rows of earlier runs for the ids just written are stale now: drop them."""
    if not job.retry:
        return
    stale: dict[str, set] = {}
    for i in batch[job.config.id_column].tolist():
        for name in job.retry.get(i, ()):
            stale.setdefault(name, set()).add(i)
    for name, ids in stale.items():
        if (job.output / name).exists():
            parts.drop_error_rows(job.output / name, ids, job.config.id_column)


def run_job(
    input_path: str,
    output: str,
    config: ScoreConfig,
    pipelines: int = 1,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    retry_errors: bool = True,
    progress_every: float = 10.0,
) -> JobSummary:
    """Score `input_path` into Parquet parts under `output`. A rerun skips rows already scored
    and, with `retry_errors`, scores rows that failed before again (their error rows then go)."""
    job = prepare_job(input_path, output, config, retry_errors)
    return execute(job, pipelines, batch_size, progress_every if progress else None)
