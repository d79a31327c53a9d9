"""Paged KV and prefix reuse change nothing a request sees: with the cache on, a prompt resumes from
a Mamba checkpoint over shared blocks and gets the same tokens and logprobs as with it off; under a
tiny block budget, preempted sequences are recomputed and the outputs equal an unconstrained run.

Stages run in-process (`backend: local`). Logprobs are compared within 1e-5: resuming re-runs the
rest of a prompt in other chunks, so fp32 sums run in another order (differences of ~1e-6)."""

import pytest

from jamba_ray.config import EngineConfig
from jamba_ray.engine.core import EngineCore
from jamba_ray.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
SYSTEM = [1] + [(7 * i) % 400 + 50 for i in range(37)]  # 38 tokens: not a multiple of the block


def core(path, stages=2, **kw) -> EngineCore:
    base = dict(
        num_stages=stages,
        backend="local",
        max_num_seqs=4,
        max_model_len=128,
        max_batched_tokens=7,
        block_size=4,
        checkpoint_every=6,
    )
    return EngineCore(EngineConfig.build(path, **{**base, **kw}))


def run(eng: EngineCore, prompts, params=GREEDY) -> list[tuple[list[int], list[float]]]:
    """Each prompt's (tokens, logprobs of those tokens), all requests at once."""
    got: dict[str, list] = {}

    def sink_for(rid):
        def sink(out):
            assert not isinstance(out, BaseException), out
            for o in out.outputs:
                tokens, lps = got.setdefault(rid, ([], []))
                tokens += o.token_ids
                lps += [d[t] for t, d in zip(o.token_ids, o.logprobs or [])]

        return sink

    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}-{id(prompts)}", p, params, sink_for(f"r{i}-{id(prompts)}"))
    while eng.has_work():
        eng.step()
    return [got[f"r{i}-{id(prompts)}"] for i in range(len(prompts))]


def assert_nothing_leaked(eng: EngineCore) -> None:
    """Once idle, only the checkpoints hold blocks (the tails past their last full block)."""
    s = eng.stats_local()
    assert s["slots_in_use"] == 0 and s["kv_blocks_in_use"] == s["kv_blocks_held_by_checkpoints"]


def assert_same(a, b):
    (ta, la), (tb, lb) = a, b
    assert ta == tb
    assert la == pytest.approx(lb, abs=1e-5)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_a_shared_system_prompt_resumes_from_a_checkpoint_and_changes_nothing(tiny_ckpt, stages):
    cold, warm = core(tiny_ckpt, stages, enable_prefix_caching=False), core(tiny_ckpt, stages)
    first, second = SYSTEM + [301, 302, 303], SYSTEM + [310, 311]
    for eng in (cold, warm):
        run(eng, [first])
    before = warm.stats_local()["prefix_cache_hits"]
    assert_same(run(warm, [second])[0], run(cold, [second])[0])
    hits = warm.stats_local()["prefix_cache_hits"] - before
    assert hits == 36  # the checkpoint every 6 tokens: 36 of the 38 shared tokens
    assert cold.stats_local()["prefix_cache_hits"] == 0
    assert_nothing_leaked(warm)


def test_a_chats_next_turn_resumes_where_the_last_answer_ended(tiny_ckpt):
    cold, warm = core(tiny_ckpt, enable_prefix_caching=False), core(tiny_ckpt)
    ((answer, _),) = run(warm, [SYSTEM])
    run(cold, [SYSTEM])
    turn = SYSTEM + answer + [120, 121, 122]
    before = warm.stats_local()["prefix_cache_hits"]
    assert_same(run(warm, [turn])[0], run(cold, [turn])[0])
    # the finished sequence left its state after every token but the last sampled one
    assert warm.stats_local()["prefix_cache_hits"] - before == len(SYSTEM) + len(answer) - 1


def test_preemption_under_a_tiny_block_budget_gives_the_unconstrained_outputs(tiny_ckpt):
    prompts = [[1, 5, 9, 200, 3, 77, 12], [1, 44, 8], [1] + list(range(300, 318)), [1, 250]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    roomy = run(core(tiny_ckpt, enable_prefix_caching=False, max_model_len=48), prompts, params)
    # 16 blocks of 4 tokens; the four sequences grow to 11 + 8 + 7 + 7 blocks
    tight = core(tiny_ckpt, enable_prefix_caching=False, max_model_len=48, num_kv_blocks=16)
    for a, b in zip(run(tight, prompts, params), roomy):
        assert_same(a, b)
    stats = tight.stats_local()
    assert stats["preemptions"] > 0
    assert_nothing_leaked(tight)


def test_forks_share_the_prompts_blocks_and_sample_as_before(tiny_ckpt):
    eng = core(tiny_ckpt)
    samples: dict[int, list[int]] = {}

    def sink(out):
        for o in out.outputs:
            samples.setdefault(o.index, []).extend(o.token_ids)

    params = SamplingParams(n=3, max_tokens=5, temperature=0, ignore_eos=True)
    eng.add_request("forked", SYSTEM, params, sink)
    eng.step()  # admitted: three slots; the forks hold one block each for their copied tail
    held = eng.stats_local()["kv_blocks_in_use"]
    assert held == 2 + 2  # the first chunk (7 tokens, the budget) took 2; 2 reserved
    while eng.has_work():
        eng.step()
    single = run(core(tiny_ckpt, enable_prefix_caching=False), [SYSTEM], GREEDY)[0][0]
    assert [samples[i] for i in range(3)] == [single[:5]] * 3
    assert eng.stats_local()["forks"] == 2
    assert_nothing_leaked(eng)


def test_rows_that_share_an_instruction_compute_it_once(tiny_ckpt):
    """LLM.generate and LLM.score (what batch jobs run) send the first row of a shared prefix ahead:
    the others resume from its checkpoints (scoring takes the prompt logprobs the checkpoint kept
    for the positions it covers) and answer as without the cache."""
    from jamba_ray.engine.llm import LLM

    rows = [SYSTEM + [60 + i, 61 + i, 62 + i] for i in range(4)]
    base = dict(
        num_stages=2,
        backend="local",
        max_num_seqs=4,
        max_model_len=128,
        block_size=4,
        checkpoint_every=6,
    )
    cached, plain = LLM(tiny_ckpt, **base), LLM(tiny_ckpt, enable_prefix_caching=False, **base)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    got, want = cached.generate(rows, params), plain.generate(rows, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [o.num_cached_tokens for o in got] == [0, 36, 36, 36]
    scored = [r + [90] for r in rows]  # new prompts: no checkpoint with logprobs covers them yet
    before = cached.stats()["prefix_cache_hits"]
    for a, b in zip(cached.score(scored), plain.score(scored)):
        assert len(a["token_logprobs"]) == len(b["token_logprobs"]) == len(SYSTEM) + 3
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-5)
    assert cached.stats()["prefix_cache_hits"] - before == 3 * 36  # rows 2-4 resumed at 36


# ---- checkpoints emitted inside full-size chunks ----------------------------------------------
def llms(path, **kw):
    """A warm LLM and a cold one (prefix caching off: the oracle), stages in-process."""
    from jamba_ray.engine.llm import LLM

    base = dict(num_stages=2, backend="local", max_num_seqs=4, max_model_len=400, **kw)
    return LLM(path, **base), LLM(path, enable_prefix_caching=False, **base)


def answer(out):
    o = out.outputs[0]
    return o.token_ids, [d[t] for t, d in zip(o.token_ids, o.logprobs)]


def test_an_exact_repeat_resumes_one_token_short_of_its_end(tiny_ckpt):
    """The prefill emitted a checkpoint after all but the prompt's last token (39: inside a
    block): a repeat runs that token alone, for its logits, and answers as a cold run."""
    warm, cold = llms(tiny_ckpt, block_size=4, checkpoint_every=16)
    prompt = SYSTEM + [301, 302]  # 40 tokens
    first, again = warm.generate([prompt], GREEDY), warm.generate([prompt], GREEDY)
    (want,) = cold.generate([prompt], GREEDY)
    assert [first[0].num_cached_tokens, again[0].num_cached_tokens] == [0, len(prompt) - 1]
    for got in (first[0], again[0]):
        assert_same(answer(got), answer(want))
    # with prompt logprobs: the checkpoint kept those of the positions it covers (all of them)
    scored = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    prompt = SYSTEM + [303, 304]
    first, again = (warm.generate([prompt], scored)[0] for _ in range(2))
    assert again.num_cached_tokens == len(prompt) - 1
    assert len(again.prompt_logprobs) == len(first.prompt_logprobs) == len(prompt)
    for a, b in zip(first.prompt_logprobs[1:], again.prompt_logprobs[1:]):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)


def test_an_exact_repeat_evicts_no_checkpoint_for_the_state_it_already_has(tiny_ckpt):
    """A repeat resumes one token short and runs the last one, whose state the catalog holds
    already: reserving an index for it would evict another prompt's checkpoint for nothing."""
    warm, _ = llms(tiny_ckpt, block_size=4, checkpoint_every=64, num_checkpoints=4)
    a, b = SYSTEM + [301, 302], SYSTEM[:30] + [305, 306, 307]
    warm.generate([a], GREEDY)
    warm.generate([b], GREEDY)  # the catalog is full (4) after these two
    held = {(cp.length, cp.tail) for cp in warm.engine.kv.prefix.checkpoints()}
    for _ in range(3):
        assert warm.generate([b], GREEDY)[0].num_cached_tokens == len(b) - 1
    assert {(cp.length, cp.tail) for cp in warm.engine.kv.prefix.checkpoints()} == held


def test_requests_sharing_a_prefix_resume_at_its_last_shared_block_from_the_third_on(tiny_ckpt):
    """A 300-token prefix, 16-token blocks, the default checkpoint every 256: the second request
    resumes at 256 and, its cached full blocks reaching 288 (18 blocks), emits a checkpoint
    there (a junction); the third resumes at 288. All answer as cold runs."""
    warm, cold = llms(tiny_ckpt, block_size=16)
    shared = [1] + [(13 * i) % 400 + 20 for i in range(299)]
    prompts = [shared + [430 + i, 440 + i] for i in range(3)]
    got = [warm.generate([p], GREEDY)[0] for p in prompts]
    assert [o.num_cached_tokens for o in got] == [0, 256, 288]
    for o, want in zip(got, cold.generate(prompts, GREEDY)):
        assert_same(answer(o), answer(want))


def test_a_long_prompt_runs_in_as_many_micro_batches_as_the_token_budget_needs(tiny_ckpt):
    """100 tokens, a budget of 32, a checkpoint every 8: 4 micro-batches (not 13, one per
    checkpoint), and a repeat resumes from the checkpoint after 99 they emitted."""
    eng = core(tiny_ckpt, stages=1, max_batched_tokens=32, checkpoint_every=8)
    prompt = [1] + list(range(100, 199))
    steps, first = 0, []
    eng.add_request("long", prompt, GREEDY, lambda out: first.extend(out.outputs[0].token_ids))
    while not first:
        eng.step()
        steps += 1
    assert steps == 4
    while eng.has_work():
        eng.step()
    before = eng.stats_local()["prefix_cache_hits"]
    run(eng, [prompt])
    assert eng.stats_local()["prefix_cache_hits"] - before == 99
    assert_nothing_leaked(eng)


def test_scoring_a_prompt_that_differs_only_in_its_last_token_gets_its_own_logprob(tiny_ckpt):
    """The checkpoint one token before a prompt's end keeps the logprob entry of the token that
    followed there; a prompt with another last token must not take it (planted: matching on the
    logprobs' k alone, the second prompt's last entry names the first prompt's token)."""
    from jamba_ray import LLM

    score = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    first, second = SYSTEM[:20] + [11], SYSTEM[:20] + [12]
    warm = LLM(config=EngineConfig.build(tiny_ckpt, backend="local"))
    warm.generate([first], score)
    (out,) = warm.generate([second], score)
    (cold,) = LLM(config=EngineConfig.build(tiny_ckpt, backend="local")).generate([second], score)
    assert list(out.prompt_logprobs[-1]) == [12]
    assert out.prompt_logprobs[-1][12] == pytest.approx(cold.prompt_logprobs[-1][12], abs=1e-5)
