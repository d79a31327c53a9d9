"""The vLLM-style `LLM` facade: generate over many prompts, stats, errors."""

import pytest

from jamba_ray import LLM, SamplingParams
from jamba_ray.errors import ConfigError, InvalidRequestError, ModelNotFoundError
from tests.conftest import PROMPTS, STAGE_CPUS, hf_greedy


@pytest.fixture(scope="module")
def llm(tiny_ckpt, ray_session):
    engine = LLM(tiny_ckpt, num_stages=2, num_cpus_per_stage=STAGE_CPUS, max_num_seqs=8)
    yield engine
    engine.shutdown()


def test_generate_matches_transformers_and_frees_every_slot(llm, tiny_ckpt):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    for prompt, out in zip(PROMPTS, outs):
        ref, _ = hf_greedy(tiny_ckpt, prompt, 10)
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length" and out.finished
        assert out.outputs[0].text == llm.tokenizer.decode(ref, skip_special_tokens=True)
    stats = llm.stats()
    assert stats["slots_in_use"] == 0 and stats["slots_total"] == 8 and len(stats["stages"]) == 2


def test_string_prompts_are_tokenized_with_bos(llm):
    (out,) = llm.generate(["hello world"], SamplingParams(max_tokens=3, temperature=0))
    assert out.prompt == "hello world"
    assert out.prompt_token_ids == llm.tokenizer("hello world").input_ids
    assert 1 <= len(out.outputs[0].token_ids) <= 3


def test_generation_stops_at_eos(llm, tiny_ckpt):
    eos = llm.tokenizer.eos_token_id
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[])
    # Find where greedy decoding goes, then make that token the stop token.
    first = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0]
    stop_at = first.token_ids[2]
    out = llm.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at])
    )[0].outputs[0]
    assert out.token_ids[-1] == stop_at and out.finish_reason == "stop"
    assert len(out.token_ids) == first.token_ids.index(stop_at) + 1
    assert params.max_tokens == 10 and eos == 2


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
