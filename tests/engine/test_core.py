"""The engine core over real stages run in-process (`backend: local`): no Ray, so it is fast."""

import pytest

from jamba_ray.config import EngineConfig
from jamba_ray.engine.core import EngineCore
from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.errors import StageFailedError
from tests.conftest import PROMPTS, assert_greedy_like_hf

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

    def forward(msg, x, *rest):
        if (x == POISON).any():
            raise RuntimeError("cannot compute this token")
        return real(msg, x, *rest)

    stage.model.forward = forward


def test_in_process_stages_match_transformers(tiny_ckpt):
    eng = core(tiny_ckpt)
    got = run(eng, PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert_greedy_like_hf(tiny_ckpt, p, got[f"r{i}"])
    assert eng.stats_local()["slots_in_use"] == 0


def test_an_error_caused_by_one_request_fails_only_that_request(tiny_ckpt):
    """The poisoned prompt shares its first micro-batch with the others: all of them re-run alone,
    the poisoned one fails again and ends with a clear error, the others finish as if untouched."""
    eng = core(tiny_ckpt)
    poison_first_stage(eng)
    prompts = [PROMPTS[0], PROMPTS[1] + [POISON], PROMPTS[3]]
    got = run(eng, prompts)
    assert isinstance(got["r1"], StageFailedError) and "cannot compute this token" in str(got["r1"])
    assert_greedy_like_hf(tiny_ckpt, PROMPTS[0], got["r0"])
    assert_greedy_like_hf(tiny_ckpt, PROMPTS[3], got["r2"])
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
    assert len(last.sampling.rows) <= 1 and len(last.pool.tables) <= 1


@pytest.mark.parametrize("n", [1, 3])
def test_classify_without_a_classification_head_is_refused_up_front(tiny_ckpt, n):
    from jamba_ray.errors import InvalidRequestError

    eng = core(tiny_ckpt)
    with pytest.raises(InvalidRequestError, match="classification head"):
        eng.add_request("c", PROMPTS[0], SamplingParams(n=n), lambda out: None, task="classify")
    assert not eng.has_work()


def test_a_bad_request_is_refused_as_bad_even_when_the_queue_is_full(tiny_ckpt):
    """Validation comes before the queue check: a client must learn its request is wrong (400),
    not be told to retry a request that can never run (429)."""
    from jamba_ray.errors import CapacityError, InvalidRequestError

    eng = core(tiny_ckpt, max_waiting=1)
    eng.add_request("queued", PROMPTS[0], GREEDY, lambda out: None)  # not scheduled: queue full
    bad = [
        ([1, 10**6], GREEDY, "out of range"),
        ([1] * 200, GREEDY, "maximum context length"),
        (PROMPTS[1], SamplingParams(max_tokens=500), "maximum context length"),
        (PROMPTS[1], SamplingParams(n=7), "state slots"),
    ]
    for i, (prompt, params, words) in enumerate(bad):
        with pytest.raises(InvalidRequestError, match=words):
            eng.add_request(f"bad{i}", prompt, params, lambda out: None)
    with pytest.raises(CapacityError, match="retry later"):
        eng.add_request("good", PROMPTS[1], GREEDY, lambda out: None)
    assert eng.scheduler.num_waiting == 1


def test_prompt_logprobs_cover_every_position_even_when_the_prefix_is_cached(tiny_ckpt):
    """Prompt log-probabilities need the logits of every prompt position, so a request that asks
    for them must compute its whole prompt even when an earlier request left its prefix's state
    cached. Checked against transformers (fp32 both: summation order only, ~1e-6)."""
    import torch

    from tests.conftest import hf_model

    eng = core(tiny_ckpt)
    run(eng, [PROMPTS[2]])  # leaves PROMPTS[2]'s state behind, as any earlier request may
    prompt = PROMPTS[2] + [5, 6, 7]
    got: list = []
    eng.add_request(
        "scored",
        prompt,
        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
        lambda out: got.append(out),
    )
    while eng.has_work():
        eng.step()
    lps = got[-1].prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(tiny_ckpt)(torch.tensor([prompt])).logits[0], -1)
    for i in range(1, len(prompt)):
        assert lps[i][prompt[i]] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4), i


def test_a_checkpoint_saved_by_a_message_that_failed_part_way_is_not_reused(tiny_ckpt):
    """The last stage fails the message that also makes a checkpoint (emitted inside its chunk):
    the first stage wrote it, the last did not. Its request fails alone; the same prompt again
    must not resume from it."""
    eng = core(tiny_ckpt, checkpoint_every=8, max_batched_tokens=8)
    last, failed = eng.pipeline.stages[1], []
    real = last.forward

    def forward(msg, x):
        if (msg.saves or any(s.emits for s in msg.segments)) and not failed:
            failed.append(msg.step_id)
            raise RuntimeError("lost in the last stage")
        return real(msg, x)

    last.forward = forward
    first = run(eng, [PROMPTS[2]])
    assert failed and isinstance(first["r0"], StageFailedError)
    again = run(eng, [PROMPTS[2]])  # ids restart at r0: the first request has ended
    assert_greedy_like_hf(tiny_ckpt, PROMPTS[2], again["r0"])
    # (the last stage's checkpoint there would be zeros: the tiny model's greedy tokens may not
    # show it, so the reuse itself is what is checked)
    assert eng.stats_local()["prefix_cache_hits"] == 0 and eng.stats_local()["slots_in_use"] == 0
