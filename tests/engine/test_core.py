"""The engine core over real stages run in-process (`backend: local`): no Ray, so it is fast."""

import pytest

from jamba_ray.config import EngineConfig
from jamba_ray.engine.core import EngineCore
from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.errors import StageFailedError
from tests.conftest import PROMPTS, hf_greedy

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
POISON = 499  # a token id the broken stage below refuses


def core(path, **kw) -> EngineCore:
    base = dict(
        num_stages=2, backend="local", max_num_seqs=6, max_model_len=128, max_batched_tokens=16
    )
    return EngineCore(EngineConfig.build(path, **{**base, **kw}))


def run(eng: EngineCore, prompts, params=GREEDY) -> dict[str, object]:
    """Every prompt to the end; each request's merged tokens, or the error it ended with."""
    results: dict[str, object] = {}

    def sink_for(rid):
        def sink(out):
            if isinstance(out, BaseException):
                results[rid] = out
            else:
                results.setdefault(rid, []).extend(t for o in out.outputs for t in o.token_ids)

        return sink

    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params, sink_for(f"r{i}"))
    while eng.has_work():
        eng.step()
    return results


def poison_first_stage(eng: EngineCore) -> None:
    stage = eng.pipeline.stages[0]
    real = stage.model.forward

    def forward(msg, x, pool):
        if (x == POISON).any():
            raise RuntimeError("cannot compute this token")
        return real(msg, x, pool)

    stage.model.forward = forward


def test_in_process_stages_match_transformers(tiny_ckpt):
    eng = core(tiny_ckpt)
    got = run(eng, PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert got[f"r{i}"] == hf_greedy(tiny_ckpt, p, 6)[0]
    assert eng.stats_local()["slots_in_use"] == 0


def test_an_error_caused_by_one_request_fails_only_that_request(tiny_ckpt):
    """The poisoned prompt shares its first micro-batch with the others: all of them re-run alone,
    the poisoned one fails again and ends with a clear error, the others finish as if untouched."""
    eng = core(tiny_ckpt)
    poison_first_stage(eng)
    prompts = [PROMPTS[0], PROMPTS[1] + [POISON], PROMPTS[3]]
    got = run(eng, prompts)
    assert isinstance(got["r1"], StageFailedError) and "cannot compute this token" in str(got["r1"])
    assert got["r0"] == hf_greedy(tiny_ckpt, PROMPTS[0], 6)[0]
    assert got["r2"] == hf_greedy(tiny_ckpt, PROMPTS[3], 6)[0]
    stats = eng.stats_local()
    assert (
        stats["slots_in_use"] == 0
        and stats["isolated_failures"] == 2
        and stats["stage_restarts"] == 0
    )


def test_a_request_alone_in_a_failing_micro_batch_fails_at_once(tiny_ckpt):
    eng = core(tiny_ckpt)
    poison_first_stage(eng)
    got = run(eng, [[1, POISON]])
    assert isinstance(got["r0"], StageFailedError)
    assert eng.stats_local()["isolated_failures"] == 1 and eng.stats_local()["slots_in_use"] == 0


def test_the_last_stage_forgets_finished_sequences(tiny_ckpt):
    eng = core(tiny_ckpt)
    run(eng, PROMPTS, SamplingParams(n=2, max_tokens=3, temperature=1.0, seed=1))
    last = eng.pipeline.stages[-1]
    # ids of the last sequences to finish ride out with the next message
    run(eng, [PROMPTS[0]], SamplingParams(max_tokens=1))
    assert len(last.table.rows) <= 1


@pytest.mark.parametrize("n", [1, 3])
def test_classify_without_a_classification_head_is_refused_up_front(tiny_ckpt, n):
    from jamba_ray.errors import InvalidRequestError

    eng = core(tiny_ckpt)
    with pytest.raises(InvalidRequestError, match="classification head"):
        eng.add_request("c", PROMPTS[0], SamplingParams(n=n), lambda out: None, task="classify")
    assert not eng.has_work()
