"""The output directory's rule, on real Parquet files: one row per id, error rows give way to
newer rows, rows without an error are never removed. No Ray."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from jamba_ray.batch import parts


def write(out: Path, rows: list[tuple[int, str | None]], name: str | None = None) -> Path:
    batch = pd.DataFrame({"id": [i for i, _ in rows], "error": [e for _, e in rows]})
    if name is None:
        time.sleep(0.001)  # distinct write stamps
        return parts.write_part(out, batch)
    batch.to_parquet(out / name, index=False)
    return out / name


def ids_in(out: Path) -> list[tuple[int, str | None]]:
    df = pd.concat([pd.read_parquet(p) for p in parts.list_parts(out)], ignore_index=True)
    errors = [e if isinstance(e, str) else None for e in df["error"]]
    return sorted(zip(df["id"].tolist(), errors), key=lambda r: (r[0], r[1] or ""))


def test_a_newer_row_supersedes_an_older_error_row_and_nothing_else_goes(tmp_path):
    old = write(tmp_path, [(0, None), (1, "stage died"), (2, "stage died")])
    write(tmp_path, [(1, None), (3, None)])  # a retry of 1 succeeded
    write(tmp_path, [(2, "text is empty")])  # a retry of 2 failed again
    state = parts.read_state(tmp_path, "id")
    assert ids_in(tmp_path) == [(0, None), (1, None), (2, "text is empty"), (3, None)]
    assert state.done == {0, 1, 3} and set(state.failed) == {2} and old.exists()


def test_a_part_left_without_rows_is_removed_and_an_unreadable_one_too(tmp_path):
    old = write(tmp_path, [(5, "timeout")])
    write(tmp_path, [(5, None)])
    (tmp_path / "part-00000000000000000001-broken.parquet").write_bytes(b"not parquet")
    state = parts.read_state(tmp_path, "id")
    assert not old.exists() and len(parts.list_parts(tmp_path)) == 1
    assert state.done == {5} and state.failed == {}


def test_parts_of_older_versions_count_as_oldest(tmp_path):
    write(tmp_path, [(7, None)])
    legacy = write(tmp_path, [(7, "stage died"), (8, "stage died")], name="part-0a1b2c.parquet")
    assert parts.list_parts(tmp_path)[0] == legacy
    state = parts.read_state(tmp_path, "id")
    assert ids_in(tmp_path) == [(7, None), (8, "stage died")]
    assert state.failed == {8: {legacy.name}}


def test_duplicate_ids_within_one_part_are_both_kept(tmp_path):
    write(tmp_path, [(1, "bad"), (1, None), (1, "bad")])
    state = parts.read_state(tmp_path, "id")
    assert len(ids_in(tmp_path)) == 3 and state.done == {1} and state.failed == {}


def test_drop_error_rows_touches_only_error_rows_of_the_given_ids(tmp_path):
    part = write(tmp_path, [(1, "x"), (2, "x"), (3, None)])
    parts.drop_error_rows(part, {2, 3}, "id")
    assert ids_in(tmp_path) == [(1, "x"), (3, None)]
