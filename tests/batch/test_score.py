"""Offline scoring jobs on real local Ray Data, with the same pipeline code as serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from jamba_ray.batch import ScoreConfig, run_job, score
from jamba_ray.errors import InvalidRequestError
from jamba_ray.tiny import TinySpec, init_tiny
from tests.conftest import STAGE_CPUS, hf_model

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
    return ScoreConfig(
        model=model,
        num_stages=2,
        num_cpus_per_stage=STAGE_CPUS,
        max_batched_tokens=16,
        max_num_seqs=8,
        max_model_len=256,
        **kw,
    )


def read_parts(out: Path) -> pd.DataFrame:
    return pd.concat(
        [pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))], ignore_index=True
    )


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory) -> str:
    return str(init_tiny(tmp_path_factory.mktemp("cls"), TinySpec(seed=3, classifier_labels=3)))


def test_loglik_equals_hf_and_keeps_every_column(tiny_ckpt, ray_session, tmp_path):
    rows = [{"id": i, "text": t, "source": f"s{i}"} for i, t in enumerate(TEXTS)]
    summary = run_job(
        write_jsonl(tmp_path / "in.jsonl", rows),
        str(tmp_path / "out"),
        cfg(tiny_ckpt, token_logprobs=True),
        batch_size=2,
        progress=False,
    )
    df = read_parts(tmp_path / "out").sort_values("id")
    assert list(df["id"]) == [0, 1, 2, 3] and list(df["source"]) == ["s0", "s1", "s2", "s3"]
    assert summary.rows == 4 and summary.errors == 0 and summary.tokens == df["num_tokens"].sum()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    for text, (_, row) in zip(TEXTS, df.iterrows()):
        ids = tok(text).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(
                hf_model(tiny_ckpt)(torch.tensor([ids])).logits[0].double(), -1
            )
        expected = sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
        assert row["logprob"] == pytest.approx(expected, abs=1e-4)
        assert row["num_tokens"] == len(ids) and len(row["token_logprobs"]) == len(ids) - 1
        assert row["perplexity"] == pytest.approx(
            float(torch.exp(torch.tensor(-expected / (len(ids) - 1)))), rel=1e-4
        )
        assert pd.isna(row["error"])


def test_classify_equals_hf_sequence_classification(classifier_ckpt, ray_session, tmp_path):
    from transformers import AutoTokenizer, JambaForSequenceClassification

    ds = score(
        write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)]),
        cfg(classifier_ckpt, task="classify"),
        batch_size=4,
    )
    df = ds.to_pandas().sort_values("id")
    ref = JambaForSequenceClassification.from_pretrained(classifier_ckpt).eval()
    tok = AutoTokenizer.from_pretrained(classifier_ckpt)
    for text, (_, row) in zip(TEXTS, df.iterrows()):
        with torch.no_grad():
            expected = ref(torch.tensor([tok(text).input_ids])).logits[0]
        torch.testing.assert_close(
            torch.tensor(list(row["logits"]), dtype=torch.float32), expected, atol=1e-4, rtol=0
        )
        assert row["label"] == int(expected.argmax()) and sum(row["probs"]) == pytest.approx(1.0)


def test_bad_rows_become_error_rows_and_the_rest_succeed(tiny_ckpt, ray_session, tmp_path):
    rows = [
        {"id": 0, "text": TEXTS[0]},
        {"id": 1, "text": ""},
        {"id": 2, "text": None},
        {"id": 3, "text": "word " * 400},
        {"id": 4, "text": TEXTS[1]},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    run_job(src, str(tmp_path / "err"), cfg(tiny_ckpt), batch_size=5, progress=False)
    df = read_parts(tmp_path / "err").sort_values("id").set_index("id")
    assert list(df.index) == [0, 1, 2, 3, 4]
    assert pd.isna(df.loc[0, "error"]) and pd.isna(df.loc[4, "error"]) and df.loc[0, "logprob"] < 0
    assert "non-empty string" in df.loc[1, "error"] and "non-empty string" in df.loc[2, "error"]
    assert "exceed" in df.loc[3, "error"]
    run_job(
        src,
        str(tmp_path / "trunc"),
        cfg(tiny_ckpt, too_long="truncate"),
        batch_size=5,
        progress=False,
    )
    trunc = read_parts(tmp_path / "trunc").set_index("id")
    assert pd.isna(trunc.loc[3, "error"]) and trunc.loc[3, "num_tokens"] == 255


def test_generate_task_uses_sampling_flags(tiny_ckpt, ray_session, tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS[:2])]
    )
    df = score(
        src,
        cfg(
            tiny_ckpt,
            task="generate",
            sampling={"max_tokens": 5, "temperature": 0.0, "ignore_eos": True},
        ),
    ).to_pandas()
    assert all(df["finish_reason"] == "length") and all(df["completion"].str.len() > 0)


def test_bad_job_settings_fail_before_any_actor_starts(tiny_ckpt):
    with pytest.raises(InvalidRequestError, match="unknown task"):
        ScoreConfig(model=tiny_ckpt, task="embed")
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        ScoreConfig(model=tiny_ckpt, task="generate", sampling={"max_tokens": 0})
    with pytest.raises(InvalidRequestError, match="classification head"):
        score("unused.jsonl", ScoreConfig(model=tiny_ckpt, task="classify"))


def test_killed_job_resumes_without_duplicating_rows(tiny_ckpt, ray_session, tmp_path):
    n = 160  # enough parts that the kill lands mid-job however fast this machine is
    rows = [{"id": i, "text": f"{TEXTS[i % 3]} number {i}"} for i in range(n)]
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "jamba_ray",
        "score",
        "--model",
        tiny_ckpt,
        "--input",
        src,
        "--output",
        str(out),
        "--batch-size",
        "2",
        "--stages",
        "1",
        "--cpus-per-stage",
        str(STAGE_CPUS),
    ]
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
