"""Stage failures: a dead stage is replaced and its sequences replayed, or requests fail clearly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import ray

from jamba_ray.config import EngineConfig
from jamba_ray.engine.async_engine import AsyncEngine
from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.errors import StageFailedError
from jamba_ray.runtime.stage_spec import probe_message
from tests.conftest import PROMPTS, STAGE_CPUS, steps_before_tie

GREEDY64 = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
TRACED64 = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=2)


def engine(path, **kw) -> AsyncEngine:
    return AsyncEngine(
        EngineConfig.build(
            path,
            num_stages=3,
            num_cpus_per_stage=STAGE_CPUS,
            max_num_seqs=4,
            max_model_len=256,
            max_batched_tokens=8,
            **kw,
        )
    )


async def stream_traced(eng, prompt, params, kill_after: int | None = None, victims=(1,)):
    """(tokens, their logprob entries); `victims` are killed together after `kill_after` tokens."""
    tokens, entries = [], []
    async for out in await eng.generate(prompt, params):
        tokens += [t for o in out.outputs for t in o.token_ids]
        entries += [e for o in out.outputs for e in (o.logprobs or [])]
        if kill_after is not None and len(tokens) >= kill_after:
            for v in victims:
                ray.kill(eng.core.pipeline.stages[v])
            kill_after = None
    return tokens, entries


async def stream_tokens(eng, prompt, params, kill_after: int | None = None, victim: int = 1):
    return (await stream_traced(eng, prompt, params, kill_after, (victim,)))[0]


def assert_replay_like_clean(clean, disturbed) -> None:
    """A replay rebuilds state in other batch shapes than the clean run computed it, so the two
    agree to float rounding (fp32, ~1e-6), not bit for bit: the tokens must match at every clear
    call, their logprobs within 1e-4; past the clean run's first near-tie they may part.
    Nothing may be lost or repeated: the lengths are equal."""
    (tokens, entries), (got, got_entries) = clean, disturbed
    assert len(got) == len(tokens) and len(entries) == len(tokens)
    clear = steps_before_tie([sorted(e.values(), reverse=True)[:2] for e in entries])
    assert got[:clear] == tokens[:clear], (clear, got, tokens)
    for i in range(clear):
        assert abs(got_entries[i][got[i]] - entries[i][tokens[i]]) < 1e-4, i


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


@pytest.mark.parametrize("transport", ["object_store", "p2p"])
def test_killing_the_middle_stage_mid_stream_loses_and_repeats_nothing(
    transport, tiny_ckpt, ray_session
):
    """With p2p, the survivors and the replacement form a new group before the replay."""

    async def go():
        eng = engine(tiny_ckpt, transport=transport)
        try:
            clean = await stream_traced(eng, PROMPTS[2], TRACED64)
            others = [asyncio.create_task(stream_tokens(eng, p, GREEDY64)) for p in PROMPTS[:2]]
            disturbed = await stream_traced(eng, PROMPTS[2], TRACED64, kill_after=10)
            other_tokens = await asyncio.gather(*others)
            stats = await eng.stats()
            return clean, disturbed, other_tokens, stats
        finally:
            eng.shutdown()

    clean, disturbed, others, stats = run(go())
    assert_replay_like_clean(clean, disturbed)
    assert len(clean[0]) == 64
    assert all(len(t) == 64 for t in others)
    assert stats["stage_restarts"] == 1
    assert stats["slots_in_use"] == 0
    assert {s["transport"] for s in stats["stages"]} == {
        "object_store" if transport == "object_store" else "p2p/gloo"
    }


def test_several_stages_dead_at_once_are_all_replaced_and_the_stream_goes_on(
    tiny_ckpt, ray_session
):
    async def go():
        eng = engine(tiny_ckpt)
        try:
            clean = await stream_traced(eng, PROMPTS[0], TRACED64)
            disturbed = await asyncio.wait_for(
                stream_traced(eng, PROMPTS[0], TRACED64, kill_after=10, victims=(0, 2)), 120
            )
            return clean, disturbed, await eng.stats()
        finally:
            eng.shutdown()

    clean, disturbed, stats = run(go())
    assert_replay_like_clean(clean, disturbed)
    assert stats["stage_restarts"] == 2 and stats["slots_in_use"] == 0
    assert len({s["pid"] for s in stats["stages"]}) == 3


def test_a_replacement_that_misses_its_start_up_deadline_but_comes_up_is_used(
    tiny_ckpt, ray_session
):
    async def go():
        eng = engine(tiny_ckpt)
        pipe, real_replace = eng.core.pipeline, eng.core.pipeline.replace

        def late(indices, trusted=None):  # the actor starts, but its readiness check gives up
            real_replace(indices, trusted)  # first (once)
            pipe.replace = real_replace
            raise StageFailedError("timed out waiting for replacement stage start-up")

        try:
            clean = await stream_traced(eng, PROMPTS[2], TRACED64)
            pipe.replace = late
            disturbed = await asyncio.wait_for(
                stream_traced(eng, PROMPTS[2], TRACED64, kill_after=10), 120
            )
            return clean, disturbed, await eng.stats()
        finally:
            eng.shutdown()

    clean, disturbed, stats = run(go())
    assert_replay_like_clean(clean, disturbed)
    assert stats["stage_restarts"] == 1 and stats["slots_in_use"] == 0


def test_a_replacement_killed_while_it_loads_is_replaced_again_and_resumes_from_snapshots(
    tiny_ckpt, ray_session, monkeypatch
):
    """Replacements load slowly (the test knob); the first one is killed while it loads. The
    recovery starts over, the second one imports the snapshots, and the stream goes on."""
    monkeypatch.setenv("JAMBA_RAY_REPLACEMENT_DELAY_S", "3")

    async def go():
        eng = engine(tiny_ckpt, checkpoint_every=8)
        pipe, real_start, started = eng.core.pipeline, eng.core.pipeline._start, []

        def start_then_kill_the_first(spec, replacement=False):
            actor = real_start(spec, replacement)
            if replacement and not started:
                ray.kill(actor)  # it dies while it sleeps before loading
            started.append(replacement)
            return actor

        try:
            clean = await stream_traced(eng, PROMPTS[2], TRACED64)
            before = (await eng.stats())["stages"][0]["prefill_tokens"]
            pipe._start = start_then_kill_the_first
            disturbed = await asyncio.wait_for(
                stream_traced(eng, PROMPTS[2], TRACED64, kill_after=30, victims=(2,)), 180
            )
            return clean, disturbed, started, before, await eng.stats()
        finally:
            eng.shutdown()

    clean, disturbed, started, before, stats = run(go())
    assert_replay_like_clean(clean, disturbed)
    assert started == [True, True] and stats["slots_in_use"] == 0
    # the replay only: the prompt's last token past the clean run's checkpoint at 18 (all but
    # its last) ran as a one-token segment (not a prefill one); then at most two snapshot
    # periods again (the newest snapshot's save may ride in the failed message), not all ~49
    assert 0 < stats["stages"][0]["prefill_tokens"] - before <= 16


def test_a_replay_with_prompt_logprobs_and_forks_samples_only_at_the_end_of_known_tokens(
    tiny_ckpt, ray_session
):
    """The replay re-runs prompt and outputs as chunks with all-row logits (prompt logprobs): only
    the chunk that reaches the last known token may sample, and the prompt logprobs come once."""
    params = SamplingParams(
        n=2, max_tokens=24, temperature=0, ignore_eos=True, prompt_logprobs=1, logprobs=2
    )

    async def collect(eng, kill_after=None):
        samples, final = {0: ([], []), 1: ([], [])}, None
        async for out in await eng.generate(PROMPTS[2], params):
            for o in out.outputs:
                samples[o.index][0].extend(o.token_ids)
                samples[o.index][1].extend(o.logprobs or [])
            final = out
            if kill_after is not None and sum(len(t) for t, _ in samples.values()) >= kill_after:
                ray.kill(eng.core.pipeline.stages[1])
                kill_after = None
        return samples, final.prompt_logprobs

    async def go():
        eng = engine(tiny_ckpt)
        try:
            return (
                await collect(eng),
                await asyncio.wait_for(collect(eng, kill_after=14), 120),
                await eng.stats(),
            )
        finally:
            eng.shutdown()

    (clean, clean_lp), (disturbed, lp), stats = run(go())
    assert stats["stage_restarts"] == 1
    for i in (0, 1):  # greedy forks: the same tokens, each sample replayed like the clean run
        assert_replay_like_clean(clean[i], disturbed[i])
        assert len(clean[i][0]) == 24
    assert (
        len(lp) == len(PROMPTS[2]) == len(clean_lp) and lp[0] is None
    )  # once, not once per sample
    for a, b in zip(lp[1:], clean_lp[1:]):  # recomputed in other chunks: equal up to float rounding
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_a_failing_postprocess_ends_its_requests_and_the_engine_keeps_serving(
    tiny_ckpt, ray_session
):
    async def go():
        eng = engine(tiny_ckpt)
        real = eng.core.outputs.token

        def broken(*args):
            eng.core.outputs.token = real  # once
            raise RuntimeError("bug")

        try:
            eng.core.outputs.token = broken
            with pytest.raises(
                StageFailedError, match="postprocessing a step failed: RuntimeError: bug"
            ):
                await asyncio.wait_for(stream_tokens(eng, PROMPTS[0], GREEDY64), 120)
            after = await asyncio.wait_for(
                stream_tokens(eng, PROMPTS[0], SamplingParams(max_tokens=3)), 120
            )
            return after, await eng.stats()
        finally:
            eng.shutdown()

    after, stats = run(go())
    assert len(after) == 3 and stats["slots_in_use"] == 0 and stats["requests_running"] == 0


def test_when_a_stage_cannot_be_replaced_requests_fail_clearly(tiny_ckpt, ray_session):
    async def go():
        eng = engine(tiny_ckpt, max_stage_restarts=0)
        try:
            with pytest.raises(StageFailedError, match="could not be replaced"):
                await asyncio.wait_for(
                    stream_tokens(eng, PROMPTS[0], GREEDY64, kill_after=5, victim=2), 120
                )
            return eng.core.stats_local()
        finally:
            eng.shutdown()

    stats = run(go())
    assert stats["slots_in_use"] == 0 and stats["requests_running"] == 0


def test_a_p2p_link_that_lost_a_message_fails_its_requests_then_is_re_formed(
    tiny_ckpt, ray_session
):
    """Stage 0 sends hidden states nobody receives: stage 1 sees a sequence gap and refuses to mix
    batches; the requests in that step fail clearly, and the next request runs on a new group."""

    async def go():
        eng = engine(tiny_ckpt, transport="p2p")
        try:
            before = await stream_tokens(
                eng, PROMPTS[0], SamplingParams(max_tokens=4, temperature=0)
            )
            stray = probe_message(eng.core.pipeline.specs[0])
            await eng.core.pipeline.stages[0].forward.remote(
                stray, np.array([1, 2])
            )  # never received
            with pytest.raises(StageFailedError, match="failed to compute"):
                await asyncio.wait_for(stream_tokens(eng, PROMPTS[1], GREEDY64), 120)
            after = await asyncio.wait_for(
                stream_tokens(eng, PROMPTS[0], SamplingParams(max_tokens=4, temperature=0)), 120
            )
            return before, after, await eng.stats()
        finally:
            eng.shutdown()

    before, after, stats = run(go())
    assert after == before and len(after) == 4
    assert stats["stage_restarts"] == 0 and stats["slots_in_use"] == 0
    assert [s["p2p_received"] for s in stats["stages"][1:]] == [
        s["p2p_sent"] for s in stats["stages"][:-1]
    ]


@pytest.mark.parametrize(
    "snapshots, transport",
    [(True, "compiled"), (False, "object_store")],  # (per-task snapshots: the middle-stage test)
    ids=["snapshots-compiled-graph", "full-replay-per-task"],
)
def test_a_stage_killed_with_a_warm_prefix_cache_resumes_from_snapshots_or_replays_in_full(
    snapshots, transport, tiny_ckpt, ray_session
):
    """The last stage (it holds attention layer 4: KV blocks) is killed. With snapshots, the
    replacement imports every checkpoint and KV block its predecessor exported: the cache
    survives and the sequence resumes from its latest snapshot (at most `checkpoint_every` back).
    Without, the engine forgets every cached prefix (a hit would read garbage) and the sequence
    re-runs all its tokens. Either way the stream is unchanged. On a compiled graph the exports
    come back as the graph's outputs, and the graph is compiled again around the replacement."""
    shared = PROMPTS[2] + PROMPTS[0]  # 26 tokens, checkpoints every 8

    async def go():
        eng = engine(
            tiny_ckpt,
            checkpoint_every=8,
            block_size=4,
            recovery_snapshots=snapshots,
            transport=transport,
        )
        try:
            await stream_tokens(eng, shared + [5], GREEDY64)  # warms the cache
            clean = await stream_traced(eng, shared + [6], TRACED64)
            warm = await eng.stats()
            disturbed = await asyncio.wait_for(
                stream_traced(eng, shared + [6], TRACED64, kill_after=30, victims=(2,)), 120
            )
            return clean, disturbed, warm, await eng.stats()
        finally:
            eng.shutdown()

    clean, disturbed, warm, stats = run(go())
    # the first request emitted a checkpoint after all but its last token: all of `shared`
    assert warm["prefix_cache_hits"] == 26 and stats["stage_restarts"] == 1
    assert {s["transport"] for s in stats["stages"]} == {
        "compiled/shm" if transport == "compiled" else "object_store"
    }
    assert_replay_like_clean(clean, disturbed)
    assert len(clean[0]) == 64 and stats["slots_in_use"] == 0
    assert stats["kv_blocks_in_use"] == stats["kv_blocks_held_by_checkpoints"]
    hits = stats["prefix_cache_hits"] - warm["prefix_cache_hits"]
    # tokens the healthy first stage re-ran as chunks for the replay (the prompt's 1 beyond its
    # cached 26 ran before the kill as a one-token segment: not a prefill one)
    replayed = stats["stages"][0]["prefill_tokens"] - warm["stages"][0]["prefill_tokens"]
    if snapshots:  # killed ~30 tokens in (~57): back to a snapshot within two periods of 8 (the
        # newest one's save may ride in the failed message)
        assert hits - 26 >= 40 and 0 < replayed <= 16
    else:  # the whole sequence again (its prompt and the ~30 tokens sampled)
        assert hits == 26 and replayed >= 26 + 30


def test_a_second_stage_dying_while_the_first_is_replaced_is_replaced_too(tiny_ckpt, ray_session):
    """Dead stages are looked for again after each replacement; the streams go on unchanged."""

    async def go():
        eng = engine(tiny_ckpt, max_stage_restarts=3)
        pipe, real_replace = eng.core.pipeline, eng.core.pipeline.replace

        def replace_then_lose_another(indices, trusted=None):
            pipe.replace = real_replace  # once
            real_replace(indices, trusted)
            ray.kill(pipe.stages[2])  # stage 2 dies while stage 1's replacement comes up

        try:
            clean = await stream_tokens(eng, PROMPTS[2], GREEDY64)
            pipe.replace = replace_then_lose_another
            disturbed = await asyncio.wait_for(
                stream_tokens(eng, PROMPTS[2], GREEDY64, kill_after=10), 180
            )
            return clean, disturbed, await eng.stats()
        finally:
            eng.shutdown()

    clean, disturbed, stats = run(go())
    assert disturbed == clean and len(clean) == 64
    assert stats["stage_restarts"] == 2 and stats["slots_in_use"] == 0
