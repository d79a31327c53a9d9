"""The vLLM-style `LLM` facade: generate, score and classify over many prompts, stats, errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jamba_ray import LLM, SamplingParams
from jamba_ray.errors import ConfigError, InvalidRequestError, ModelNotFoundError
from jamba_ray.tiny import TinySpec, init_tiny
from tests.conftest import (
    PROMPTS,
    STAGE_CPUS,
    assert_greedy_like_hf,
    hf_greedy,
    hf_model,
    steps_before_tie,
)

EOS = 2


@pytest.fixture(scope="module")
def llm(tiny_ckpt, ray_session):
    engine = LLM(tiny_ckpt, num_stages=2, num_cpus_per_stage=STAGE_CPUS, max_num_seqs=8)
    yield engine
    engine.shutdown()


def test_generate_matches_transformers_and_frees_every_slot(llm, tiny_ckpt):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    for prompt, out in zip(PROMPTS, outs):
        c = out.outputs[0]
        assert_greedy_like_hf(tiny_ckpt, prompt, c.token_ids)
        assert c.finish_reason == "length" and out.finished and len(c.token_ids) == 10
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    stats = llm.stats()
    assert stats["slots_in_use"] == 0 and stats["slots_total"] == 8 and len(stats["stages"]) == 2


def test_string_prompts_are_tokenized_with_bos(llm):
    (out,) = llm.generate(["hello world"], SamplingParams(max_tokens=3, temperature=0))
    assert out.prompt == "hello world"
    assert out.prompt_token_ids == llm.tokenizer("hello world").input_ids
    assert 1 <= len(out.outputs[0].token_ids) <= 3


def test_generation_stops_at_a_stop_token_id(llm):
    # Find where greedy decoding goes, then make that token the stop token.
    first = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0]
    stop_at = first.token_ids[2]
    out = llm.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at])
    )[0].outputs[0]
    assert out.token_ids[-1] == stop_at and out.finish_reason == "stop"
    assert len(out.token_ids) == first.token_ids.index(stop_at) + 1


@pytest.fixture(scope="module")
def eos_model(tiny_ckpt, tmp_path_factory):
    """The tiny model with two rows of lm_head swapped, so that EOS takes the logit of the token
    greedy decoding of PROMPTS[0] reaches at step `at`: there it now says EOS, and before it
    nothing changes (the argmax of every earlier step keeps its row). The random tiny model
    itself never ranks EOS first. Returns (path, the tokens before EOS)."""
    ref, logits = hf_greedy(tiny_ckpt, PROMPTS[0], 8)
    clear = steps_before_tie(logits.topk(2, dim=-1).values)
    at = next(i for i in range(2, clear) if ref[i] not in ref[:i] and ref[i] > EOS)
    path = tmp_path_factory.mktemp("tiny-eos")
    shutil.copytree(tiny_ckpt, path, dirs_exist_ok=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"]["lm_head.weight"]
    weights = load_file(shard)
    head = weights["lm_head.weight"]
    head[[EOS, ref[at]]] = head[[ref[at], EOS]]
    save_file(weights, shard, metadata={"format": "pt"})
    llm = LLM(str(path), num_stages=2, backend="local")
    yield llm, ref[:at]
    llm.shutdown()


def test_generation_stops_at_eos_and_eos_text_is_a_special_token(eos_model):
    llm, before = eos_model
    greedy = dict(max_tokens=10, temperature=0)
    (out,) = llm.generate([PROMPTS[0]], SamplingParams(**greedy))
    c = out.outputs[0]
    assert c.token_ids == before + [EOS] and c.finish_reason == "stop"
    assert c.text == llm.tokenizer.decode(before, skip_special_tokens=True)
    assert "<|endoftext|>" not in c.text
    (raw,) = llm.generate([PROMPTS[0]], SamplingParams(**greedy, skip_special_tokens=False))
    assert raw.outputs[0].text == c.text + "<|endoftext|>"


def test_ignore_eos_runs_past_it_and_min_tokens_bans_it(eos_model):
    llm, before = eos_model
    n = len(before)
    (past,) = llm.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=n + 3, temperature=0, ignore_eos=True)
    )
    assert past.outputs[0].token_ids[: n + 1] == before + [EOS]
    assert len(past.outputs[0].token_ids) == n + 3 and past.outputs[0].finish_reason == "length"
    (held,) = llm.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=n + 3, temperature=0, min_tokens=n + 2)
    )
    tokens = held.outputs[0].token_ids
    assert tokens[:n] == before and EOS not in tokens[: n + 2] and len(tokens) >= n + 2


def test_empty_prompt_list_and_empty_prompt_are_rejected(llm):
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        llm.generate([])
    with pytest.raises(InvalidRequestError, match="must not be empty"):
        llm.generate([""])
    with pytest.raises(InvalidRequestError, match="out of range"):
        llm.generate([[1, 10**6]])
    assert llm.stats()["slots_in_use"] == 0


def test_bad_models_and_layouts_fail_before_any_actor_starts(tmp_path, tiny_ckpt, ray_session):
    with pytest.raises(ModelNotFoundError, match="no such checkpoint"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(ConfigError, match="not a Jamba config"):
        LLM(str(tmp_path))
    with pytest.raises(ConfigError, match="more stages than layers"):
        LLM(tiny_ckpt, num_stages=7)


TEXTS = [
    "hello world, the quick brown fox",
    "Ray starts the stage actors inside a placement group.",
]


def hf_token_logprobs(path: str, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(path)(torch.tensor([ids])).logits[0], -1)
    return [float(logp[i, t]) for i, t in enumerate(ids[1:])]


def test_score_equals_transformers_log_likelihood(llm, tiny_ckpt):
    """fp32 on both sides, summed in another order: equal to 1e-4. Also when an earlier request
    left a prefix of a scored text cached (as any may)."""
    llm.generate([llm.tokenizer(TEXTS[0]).input_ids[:6]], SamplingParams(max_tokens=2))
    for text, r in zip(TEXTS, llm.score(TEXTS)):
        assert r["token_ids"] == llm.tokenizer(text).input_ids
        ref = hf_token_logprobs(tiny_ckpt, r["token_ids"])
        assert r["token_logprobs"] == pytest.approx(ref, abs=1e-4)
        assert r["logprob"] == pytest.approx(sum(ref), abs=1e-3)


def test_classify_equals_transformers_sequence_classification(tmp_path):
    """Last-token pooling through the score head, as JambaForSequenceClassification; fp32 both."""
    from transformers import JambaForSequenceClassification

    path = str(init_tiny(tmp_path / "cls", TinySpec(classifier_labels=3)))
    llm = LLM(path, num_stages=2, backend="local")
    try:
        scores = llm.classify(TEXTS + [PROMPTS[2]])
        ids = [llm.tokenizer(t).input_ids for t in TEXTS] + [PROMPTS[2]]
    finally:
        llm.shutdown()
    ref = JambaForSequenceClassification.from_pretrained(path).eval()
    for got, prompt in zip(scores, ids):
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0]
        assert len(got) == 3
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=0)


def test_int8_weights_with_bf16_activations_run_the_pipeline(llm, tiny_ckpt):
    q = LLM(tiny_ckpt, num_stages=2, backend="local", quantization="int8", dtype="bfloat16")
    try:
        scored = q.score(TEXTS)
        (out,) = q.generate([PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))
        stats = q.stats()
    finally:
        q.shutdown()
    diffs = []
    for r in scored:
        ref = hf_token_logprobs(tiny_ckpt, r["token_ids"])
        diffs += [abs(a - b) for a, b in zip(r["token_logprobs"], ref)]
    # vs fp32: bf16 rounding moves a token's log-probability by ~0.03, and an MoE routing choice
    # that flips on rounding moves one token by up to ~1; a wrong model is off by nats throughout
    assert len(diffs) > 20 and max(diffs) < 1.0 and sum(diffs) / len(diffs) < 0.15
    assert len(out.outputs[0].token_ids) == 8 and stats["slots_in_use"] == 0
    # bf16 halves every weight and int8 halves the linear ones again: under half the fp32 bytes
    fp32 = sum(s["param_bytes"] for s in llm.stats()["stages"])
    assert sum(s["param_bytes"] for s in stats["stages"]) < fp32 / 2
