"""Reruns and failures mid-job: nothing scored twice, nothing lost, failed rows tried again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from jamba_ray.batch import run_job
from tests.batch.jobs import TEXTS, cfg, read_parts, write_jsonl
from tests.conftest import STAGE_CPUS


def test_a_rerun_retries_error_rows_and_keeps_one_row_per_id(
    tiny_ckpt, ray_session, tmp_path, capsys
):
    """An earlier run (written here by hand, as a part of an older version) scored row 0, and
    rows 1 and 2 failed for a passing reason; row 3 was never reached."""
    rows = [{"id": 0, "text": TEXTS[0]}, {"id": 1, "text": TEXTS[1]}, {"id": 2, "text": ""}]
    src = write_jsonl(tmp_path / "in.jsonl", [*rows, {"id": 3, "text": TEXTS[2]}])
    out = tmp_path / "out"
    out.mkdir()
    earlier = pd.DataFrame(
        {
            "id": [0, 1, 2],
            "text": [r["text"] for r in rows],
            "logprob": [-1.0, None, None],
            "num_tokens": [7, None, None],
            "perplexity": [1.5, None, None],
            "error": [None, "stage 1 died", "stage 1 died"],
        }
    )
    earlier.to_parquet(out / "part-0123abcd.parquet", index=False)

    summary = run_job(src, str(out), cfg(tiny_ckpt), batch_size=1, progress_every=0.5)
    df = read_parts(out).sort_values("id").set_index("id")
    assert list(df.index) == [0, 1, 2, 3]  # one row per id
    assert df.loc[0, "logprob"] == -1.0  # not scored again
    assert pd.isna(df.loc[1, "error"]) and df.loc[1, "logprob"] < 0  # retried, and it worked
    assert df.loc[2, "error"] == "text is empty"  # retried, failed again: the newer error stays
    assert pd.isna(df.loc[3, "error"])
    assert (summary.rows, summary.skipped, summary.retried, summary.errors) == (3, 1, 2, 1)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "/3 rows" in ln]
    assert len(lines) >= 3 and "starting pipelines" in lines[0] and "3/3 rows" in lines[-1]

    again = run_job(src, str(out), cfg(tiny_ckpt), retry_errors=False, progress=False)
    assert (again.rows, again.skipped) == (0, 4) and len(read_parts(out)) == 4


def test_killed_job_resumes_without_duplicating_rows(tiny_ckpt, ray_session, tmp_path):
    n = 80  # enough parts that the kill lands mid-job however fast this machine is
    rows = [{"id": i, "text": f"{TEXTS[i % 3]} number {i}"} for i in range(n)]
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    cmd = [sys.executable, "-m", "jamba_ray", "score", "--model", tiny_ckpt, "--input", src]
    cmd += ["--output", str(out), "--batch-size", "2", "--stages", "1"]
    cmd += ["--cpus-per-stage", str(STAGE_CPUS), "--progress-every", "2"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and len(list(out.glob("part-*.parquet"))) < 2
        and first.poll() is None
    ):
        time.sleep(0.2)
    first.kill()
    first.wait()
    written = len(read_parts(out)) if list(out.glob("part-*.parquet")) else 0
    assert written < n, "the job finished before it could be killed"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"+{written} done before" in done.stdout
    df = read_parts(out)
    assert sorted(df["id"]) == list(range(n)) and df["error"].isna().all()
    progress = [ln for ln in done.stderr.splitlines() if ln.startswith("jamba-ray score: ")]
    assert len(progress) >= 3 and f"/{n - written} rows" in progress[-1]
    assert "Running Dataset" not in done.stderr and "Progress bars" not in done.stderr


def test_a_pipeline_actor_killed_mid_job_is_replaced_and_no_row_is_lost(
    tiny_ckpt, ray_session, tmp_path
):
    n = 40
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": i, "text": f"{TEXTS[i % 3]} {i}"} for i in range(n)]
    )
    out, killed = tmp_path / "out", []
    killer = threading.Thread(target=kill_pool_actor_after_first_part, args=(out, killed))
    killer.start()
    summary = run_job(src, str(out), cfg(tiny_ckpt, num_stages=1), batch_size=2, progress=False)
    killer.join()
    if not killed:
        pytest.fail("no pool actor was alive to kill after the first part")
    df = read_parts(out)
    assert summary.rows == n and sorted(df["id"]) == list(range(n)) and df["error"].isna().all()


def kill_pool_actor_after_first_part(out, killed: list) -> None:
    import ray

    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("part-*.parquet")):
        time.sleep(0.1)
    for actor in ray._private.state.actors().values():
        if "MapWorker" in actor["ActorClassName"] and actor["State"] == "ALIVE":
            os.kill(actor["Pid"], signal.SIGKILL)
            killed.append(actor["Pid"])
            return
