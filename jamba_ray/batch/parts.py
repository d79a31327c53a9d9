"""The output directory of a job: Parquet parts, named in write order, and what a rerun skips.

One rule keeps a row per id: an error row is removed as soon as a newer part holds a row with the
same id (a retry that succeeded, or failed again with a newer error). Rows without an error are
never removed. Parts are written to a temporary name and renamed, and rewritten the same way, so a
killed job leaves only whole parts behind.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PATTERN = "part-*.parquet"


@dataclass(slots=True)
class OutputState:
    """What earlier runs left in the output directory."""

    parts: int = 0
    done: set = field(default_factory=set)  # ids with a row without error
    failed: dict = field(default_factory=dict)  # id -> names of the parts holding its error rows


def part_order(path: Path) -> tuple[int, str]:
    """Write order: `part-<ns since epoch>-<hex>`; parts of older versions (`part-<hex>`) first."""
    stamp = path.name.split("-")[1].split(".")[0]
    return (1, path.name) if len(stamp) == 20 and stamp.isdigit() else (0, path.name)


def list_parts(out: Path) -> list[Path]:
    return sorted(out.glob(PATTERN), key=part_order)


def write_part(out: Path, batch) -> Path:
    """Write one pandas batch as the newest part."""
    import pyarrow as pa

    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    _write_table(out / name, pa.Table.from_pandas(batch, preserve_index=False))
    return out / name


def _write_table(path: Path, table) -> None:
    """Write then rename, so a killed job never leaves a half-written part behind."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table.replace_schema_metadata(None), tmp)  # plain Arrow types, no pandas dtypes
    os.replace(tmp, path)


def _ids_and_errors(part: Path, id_column: str) -> tuple[list, list] | None:
    """(ids, error or None per row); None for an unreadable (foreign, damaged) part."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(part).names
        table = pq.read_table(part, columns=[c for c in (id_column, "error") if c in names])
    except Exception:
        return None
    if id_column not in table.column_names:
        return None
    errors = table.column("error").to_pylist() if "error" in table.column_names else None
    ids = table.column(id_column).to_pylist()
    return ids, errors or [None] * len(ids)


def drop_error_rows(part: Path, ids: set, id_column: str) -> None:
    """Rewrite `part` without its error rows for `ids`; a part left empty is removed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(part)
    stale = pc.and_(
        pc.is_in(table.column(id_column), value_set=_array(ids, table.column(id_column).type)),
        pc.is_valid(table.column("error")),
    )
    keep = table.filter(pc.invert(stale))
    if keep.num_rows == table.num_rows:
        return
    if keep.num_rows == 0:
        part.unlink()
    else:
        _write_table(part, keep)
    log.info(
        "%s: %d error rows superseded by newer rows", part.name, table.num_rows - keep.num_rows
    )


def _array(values: set, type_):
    import pyarrow as pa

    return pa.array(list(values), type=type_)


def read_state(out: Path, id_column: str) -> OutputState:
    """Read the ids of every part (removing unreadable parts and superseded error rows)."""
    rows: list[tuple[Path, list, list]] = []
    for part in list_parts(out):
        got = _ids_and_errors(part, id_column)
        if got is None:
            log.warning("removing unreadable part %s", part)
            part.unlink()
            continue
        rows.append((part, *got))
    newest = {i: n for n, (_, ids, _) in enumerate(rows) for i in ids}
    state = OutputState(parts=len(rows))
    failed: dict = defaultdict(set)
    for n, (part, ids, errors) in enumerate(rows):
        stale = {i for i, e in zip(ids, errors) if e is not None and newest[i] > n}
        if stale:
            drop_error_rows(part, stale, id_column)
        for i, e in zip(ids, errors):
            if e is None:
                state.done.add(i)
            elif i not in stale:
                failed[i].add(part.name)
    state.failed = {i: names for i, names in failed.items() if i not in state.done}
    return state
