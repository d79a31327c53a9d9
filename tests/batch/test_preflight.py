"""A job that cannot run fails, and one with nothing left ends, before Ray or any actor starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from jamba_ray.batch import ScoreConfig, parts, prepare_job
from jamba_ray.batch.scorer import text_error
from jamba_ray.errors import InvalidRequestError, ModelNotFoundError


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_settings_and_inputs_are_named(tiny_ckpt, tmp_path):
    with pytest.raises(InvalidRequestError, match="unknown task"):
        ScoreConfig.build(tiny_ckpt, task="embed")
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        ScoreConfig.build(tiny_ckpt, task="generate", sampling={"max_tokens": 0})
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "body": "hello"}])
    out = str(tmp_path / "out")
    with pytest.raises(
        InvalidRequestError, match=r"classification head.*init-tiny DIR --classifier K"
    ):
        prepare_job(src, out, ScoreConfig.build(tiny_ckpt, task="classify"))
    with pytest.raises(ModelNotFoundError):
        prepare_job(src, out, ScoreConfig.build(str(tmp_path / "nowhere")))
    with pytest.raises(InvalidRequestError, match=r"no 'text' column \(columns: id, body\)"):
        prepare_job(src, out, ScoreConfig.build(tiny_ckpt))
    with pytest.raises(InvalidRequestError, match=r"input \S+missing.jsonl does not exist$"):
        prepare_job(str(tmp_path / "missing.jsonl"), out, ScoreConfig.build(tiny_ckpt))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InvalidRequestError, match="cannot read input"):
        prepare_job(str(tmp_path / "junk.parquet"), out, ScoreConfig.build(tiny_ckpt))
    job = prepare_job(src, out, ScoreConfig.build(tiny_ckpt, text_column="body"))
    assert job.pending == 1 and not job.skip


def test_an_input_without_ids_cannot_be_rerun_into_the_same_output(tiny_ckpt, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    out = tmp_path / "out"
    assert prepare_job(src, str(out), ScoreConfig.build(tiny_ckpt)).pending == 2
    parts.write_part(out, pd.DataFrame({"text": ["a"], "error": [None]}))
    with pytest.raises(InvalidRequestError, match="no 'id' column to resume by"):
        prepare_job(src, str(out), ScoreConfig.build(tiny_ckpt))


def test_row_text_errors_say_what_is_wrong():
    assert text_error("", "text") == "text is empty"
    assert text_error(None, "text") == "text is missing (null)"
    assert text_error(float("nan"), "body") == "body is missing (null)"
    assert text_error(7, "text") == "text must be a string, got int"
    assert text_error(" ", "text") is None


def test_a_rerun_with_nothing_left_exits_without_starting_ray(tiny_ckpt, tmp_path):
    """Row 1 failed before; with --no-retry-errors nothing is left to do."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "text": "a"}, {"id": 1, "text": "b"}])
    out = tmp_path / "out"
    out.mkdir()
    parts.write_part(out, pd.DataFrame({"id": [0, 1], "text": ["a", "b"], "error": [None, "x"]}))
    assert prepare_job(src, str(out), ScoreConfig.build(tiny_ckpt)).pending == 1
    cmd = [sys.executable, "-m", "jamba_ray", "score", "--model", tiny_ckpt]
    cmd += ["--input", src, "--output", str(out), "--no-retry-errors"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "0 rows to score (2 done before, 0 error rows to retry)" in done.stderr
    assert "rows 0 (+2 done before, 0 retried)" in done.stdout
    assert "Ray" not in done.stderr and time.perf_counter() - t0 < 60
