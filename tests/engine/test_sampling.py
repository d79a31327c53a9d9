"""Sampling parameters are validated up front; the sampler honours each row's own parameters."""

import pytest
import torch

from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.errors import InvalidRequestError
from jamba_ray.model.sampler import RowInput, sample


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(n=0), "n"),
        (dict(stop=5), "stop"),
        (dict(stop=["a", 3]), "stop"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=2), "min_p"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(logprobs=50), "logprobs"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(stop_token_ids=["x"]), "stop_token_ids"),
        (dict(cache_salt=""), "cache_salt"),
        (dict(cache_salt=7), "cache_salt"),
    ],
)
def test_invalid_parameters_raise_a_clear_error_naming_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError, match=param) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param  # (the fronts' 400s carry it as `param`)


def test_a_cache_salt_is_a_non_empty_string_or_none():
    assert SamplingParams(cache_salt="tenant-a").cache_salt == "tenant-a"
    assert SamplingParams().cache_salt is None


def test_stop_accepts_a_string_or_a_list():
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def row(params, output=(), index=0, seed=1):
    return RowInput(params, seed, index, [1, 2], list(output))


def test_greedy_takes_the_argmax_and_reports_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    (out,) = sample(logits, [row(SamplingParams(temperature=0, logprobs=2))], eos_id=None)
    assert out.token == 1
    assert out.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0, 1]))
    assert list(out.top) == [1, 3]


def test_seeded_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = sample(logits[1:2], [row(p)], None)[0].token
    other = SamplingParams(temperature=0.7, top_k=5)
    mixed = sample(logits, [row(other), row(p), row(other, seed=9)], None)[1].token
    assert alone == mixed


FILTERS = [
    (dict(top_k=1), {0}),
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.7), {0, 1}),  # 0.5 alone falls short of 0.7
    (dict(min_p=0.5), {0, 1}),  # 0.3 >= 0.5 * 0.5 > 0.15
    (dict(), {0, 1, 2, 3}),
]


def test_top_k_min_p_and_top_p_keep_exactly_their_support():
    """Exactly: every allowed token is drawn (200 draws miss one with probability < 1e-14) and no
    other, so a filter that cuts too much fails as surely as one that cuts too little."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for k, support in FILTERS:
        seen = {
            sample(logits, [row(SamplingParams(**k), index=i)], None)[0].token for i in range(200)
        }
        assert seen == support, k


def test_min_tokens_bans_eos_and_penalties_push_repeats_down():
    logits = torch.tensor([[0.0, 0.0, 5.0, 4.0]])
    assert (
        sample(logits, [row(SamplingParams(temperature=0, min_tokens=2))], eos_id=2)[0].token == 3
    )
    rep = SamplingParams(temperature=0, frequency_penalty=2.0)
    assert sample(logits, [row(rep, output=[2])], None)[0].token == 3
    # repetition_penalty also covers the prompt (which holds token 2 here): 5 / 2 < 4
    assert (
        sample(logits, [row(SamplingParams(temperature=0, repetition_penalty=2.0))], None)[0].token
        == 3
    )


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    rows = [row(SamplingParams(temperature=1.0, seed=3), index=i) for i in range(4000)]
    counts = torch.bincount(
        torch.tensor([o.token for o in sample(logits, rows, None)]), minlength=4
    )
    assert (counts / 4000 - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03


def test_rows_with_different_filters_in_one_batch_each_keep_exactly_their_own_support():
    kinds = len(FILTERS)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(kinds * 200, 4)
    rows = [row(SamplingParams(**k), index=i) for i in range(200) for k, _ in FILTERS]
    outs = sample(logits, rows, None)
    for j, (k, support) in enumerate(FILTERS):
        assert {o.token for o in outs[j::kinds]} == support, k
