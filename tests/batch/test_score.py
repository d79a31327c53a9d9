"""Offline scoring jobs on real local Ray Data, with the same pipeline code as serving."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jamba_ray.batch import run_job, score
from jamba_ray.tiny import TinySpec, init_tiny
from tests.batch.jobs import TEXTS, cfg, read_parts, write_jsonl
from tests.conftest import STAGE_CPUS, hf_model


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
    assert pd.api.types.is_integer_dtype(df["label"]) and pd.api.types.is_integer_dtype(
        df["num_tokens"]
    )


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
    assert df.loc[1, "error"] == "text is empty" and df.loc[2, "error"] == "text is missing (null)"
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
    for part in (tmp_path / "err").glob("part-*.parquet"):  # integers, null on error rows
        assert pq.read_schema(part).field("num_tokens").type == pa.int64()


def test_generate_task_equals_llm_generate_with_the_same_flags(tiny_ckpt, ray_session, tmp_path):
    from jamba_ray import LLM, SamplingParams

    sampling = {"max_tokens": 5, "temperature": 0.0, "ignore_eos": True}
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS[:2])]
    )
    df = score(src, cfg(tiny_ckpt, task="generate", sampling=sampling)).to_pandas()
    llm = LLM(
        tiny_ckpt,
        num_stages=2,
        num_cpus_per_stage=STAGE_CPUS,
        max_num_seqs=8,
        max_batched_tokens=16,
        max_model_len=256,
    )
    try:
        outs = llm.generate(TEXTS[:2], SamplingParams(**sampling))
    finally:
        llm.shutdown()
    df = df.sort_values("id")
    assert list(df["completion"]) == [o.outputs[0].text for o in outs]
    assert list(df["finish_reason"]) == ["length", "length"]
    lengths = [len(o.prompt_token_ids) + 5 for o in outs]
    assert list(df["num_tokens"]) == lengths and all(df["completion"].str.len() > 0)


def test_parquet_input_on_two_pipelines_scores_every_row_once(tiny_ckpt, ray_session, tmp_path):
    import ray

    rows = pd.DataFrame({"id": range(8), "text": [TEXTS[i % 3] + f" {i}" for i in range(8)]})
    (tmp_path / "in").mkdir()
    for k in range(2):  # a Parquet dataset: a folder of files (Ray Data reads them as one block)
        rows[4 * k : 4 * k + 4].to_parquet(tmp_path / "in" / f"{k}.parquet", index=False)
    stages_before = _stage_actors(ray)
    ds = score(str(tmp_path / "in"), cfg(tiny_ckpt, num_stages=1), pipelines=2, batch_size=2)
    ds = ds.materialize()
    df = ds.to_pandas().sort_values("id")
    assert list(df["id"]) == list(range(8)) and df["error"].isna().all()
    assert len(_stage_actors(ray) - stages_before) == 2  # one single-stage pipeline per actor
    assert "MapBatches(PipelineScorer): 4 tasks executed" in ds.stats()  # work for both
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    for text, logprob in zip(rows["text"][:3], df["logprob"][:3]):
        assert logprob == pytest.approx(hf_loglik(tiny_ckpt, tok(text).input_ids), abs=1e-4)


def _stage_actors(ray) -> set:
    return {
        a["ActorID"]
        for a in ray._private.state.actors().values()
        if a["ActorClassName"].endswith("Stage")
    }


def hf_loglik(path: str, ids: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(path)(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
