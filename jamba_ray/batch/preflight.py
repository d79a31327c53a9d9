"""Checks a job can run before anything expensive starts: no Ray, no actors, no weights read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config.model_path import resolve
from ..errors import InvalidRequestError
from .score_config import ScoreConfig

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


@dataclass(frozen=True, slots=True)
class InputInfo:
    rows: int
    ids: list | None  # the id column, None when the input has none (the job cannot resume)


def input_format(path: str) -> str:
    """ "json" for JSON Lines files (or a local folder of them), else "parquet"."""
    p = str(path)
    if p.endswith(JSON_SUFFIXES):
        return "json"
    local = Path(p)
    if local.is_dir() and any(f.name.endswith(JSON_SUFFIXES) for f in local.iterdir()):
        return "json"
    return "parquet"


def check_task(config: ScoreConfig) -> None:
    """The checkpoint exists and has what the task needs (a classification head for classify)."""
    ckpt = resolve(config.model)
    if config.task == "classify" and "score.weight" not in ckpt.weight_map():
        raise InvalidRequestError(
            f"task 'classify' needs a checkpoint with a classification head (score.weight); "
            f"{config.model} has none. `jamba-ray init-tiny DIR --classifier K` writes a tiny "
            "one with K labels; a JambaForSequenceClassification checkpoint has one"
        )


def inspect_input(path: str, text_column: str, id_column: str) -> InputInfo:
    """Open the input with pyarrow (any filesystem it reads), check the columns, read the ids."""
    import pyarrow.dataset as pds

    if "://" not in str(path) and not Path(path).exists():
        raise InvalidRequestError(f"input {path} does not exist")
    try:
        data = pds.dataset(str(path), format=input_format(path))
        names = data.schema.names
    except Exception as e:
        raise InvalidRequestError(f"cannot read input {path}: {e}") from None
    if text_column not in names:
        raise InvalidRequestError(
            f"input {path} has no {text_column!r} column (columns: {', '.join(names)}); "
            "choose one with --text-column"
        )
    if id_column not in names:
        return InputInfo(rows=data.count_rows(), ids=None)
    ids = data.to_table(columns=[id_column]).column(0).to_pylist()
    return InputInfo(rows=len(ids), ids=ids)
