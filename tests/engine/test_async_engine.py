"""The engine on stage actors: continuous batching, chunked prefill, forks, abort, streaming."""

import asyncio
import random

import pytest

from jamba_ray.config import EngineConfig
from jamba_ray.engine.async_engine import AsyncEngine
from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.errors import InvalidRequestError
from tests.conftest import PROMPTS, STAGE_CPUS, assert_greedy_like_hf

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def config(path, **kw):
    base = dict(num_stages=2, num_cpus_per_stage=STAGE_CPUS, max_num_seqs=8, max_model_len=256)
    return EngineConfig.build(path, **{**base, **kw})


@pytest.fixture(scope="module")
def engine(tiny_ckpt, ray_session):
    """One async engine for the module, chunked prefill on (4 tokens per micro-batch)."""
    loop = asyncio.new_event_loop()
    eng = loop.run_until_complete(_make(config(tiny_ckpt, max_batched_tokens=4)))
    yield eng, loop
    eng.shutdown()
    loop.run_until_complete(asyncio.sleep(0.05))  # let the cancelled step loop unwind
    loop.close()


async def _make(cfg):
    return AsyncEngine(cfg)


async def collect(eng, prompt, params, rid=None):
    outs = []
    async for out in await eng.generate(prompt, params, rid):
        outs.append(out)
    return outs


def merged(outs):
    by = {}
    for out in outs:
        for o in out.outputs:
            cur = by.setdefault(o.index, {"tokens": [], "text": "", "reason": None})
            cur["tokens"] += o.token_ids
            cur["text"] += o.text
            cur["reason"] = o.finish_reason or cur["reason"]
    return [by[i] for i in sorted(by)]


async def slots_in_use(eng):
    return (await eng.stats())["slots_in_use"]


def test_continuous_batching_random_arrivals_match_running_alone_and_hf(engine, tiny_ckpt):
    eng, loop = engine
    prompts = [p for p in PROMPTS for _ in range(3)]
    rng = random.Random(0)

    async def one(p):
        await asyncio.sleep(rng.random() * 0.3)  # random arrival order and time
        return merged(await collect(eng, p, GREEDY))[0]["tokens"]

    async def all_():
        return await asyncio.gather(*[one(p) for p in prompts])

    got = loop.run_until_complete(all_())
    for p, tokens in zip(prompts, got):
        assert_greedy_like_hf(tiny_ckpt, p, tokens)
    assert loop.run_until_complete(slots_in_use(eng)) == 0


def test_chunked_prefill_carries_state_exactly(engine, tiny_ckpt):
    eng, loop = engine
    long_prompt = PROMPTS[2] + PROMPTS[0] + PROMPTS[1]  # 29 tokens in chunks of 4
    out = merged(loop.run_until_complete(collect(eng, long_prompt, GREEDY)))[0]
    assert_greedy_like_hf(tiny_ckpt, long_prompt, out["tokens"])


def test_seeded_sampling_is_reproducible_across_batch_compositions(engine):
    eng, loop = engine
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone = merged(loop.run_until_complete(collect(eng, PROMPTS[0], p)))[0]["tokens"]

    async def crowded():
        noise = SamplingParams(max_tokens=6, temperature=0.9)
        tasks = [collect(eng, q, noise) for q in PROMPTS[1:]]
        mine = collect(eng, PROMPTS[0], p)
        return (await asyncio.gather(mine, *tasks))[0]

    assert merged(loop.run_until_complete(crowded()))[0]["tokens"] == alone
    unseeded = SamplingParams(max_tokens=10, temperature=1.0)
    runs = {
        tuple(merged(loop.run_until_complete(collect(eng, PROMPTS[0], unseeded)))[0]["tokens"])
        for _ in range(3)
    }
    assert len(runs) > 1


FRESH = [2, 251, 252, 253]  # no other prompt shares its first token: nothing to resume from


def test_n_samples_fork_the_state_after_one_prefill(engine, tiny_ckpt):
    eng, loop = engine
    before = loop.run_until_complete(eng.stats())
    outs = merged(
        loop.run_until_complete(
            collect(eng, FRESH, SamplingParams(n=3, max_tokens=8, temperature=0, ignore_eos=True))
        )
    )
    after = loop.run_until_complete(eng.stats())
    assert len(outs) == 3
    for o in outs:  # three greedy samples of one prompt: each is HF's greedy run
        assert_greedy_like_hf(tiny_ckpt, FRESH, o["tokens"])
    for b, a in zip(before["stages"], after["stages"]):
        assert a["prefill_segments"] - b["prefill_segments"] == 1  # the prompt ran once per stage
    assert after["forks"] - before["forks"] == 2
    sampled = merged(
        loop.run_until_complete(
            collect(eng, PROMPTS[3], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5))
        )
    )
    assert len({tuple(o["tokens"]) for o in sampled}) > 1


def test_aborting_fifty_in_flight_requests_frees_every_slot(engine):
    eng, loop = engine

    async def run():
        streams = [
            await eng.generate(
                PROMPTS[i % 4], SamplingParams(max_tokens=200, temperature=0.5, ignore_eos=True)
            )
            for i in range(50)
        ]
        firsts = [await s.__anext__() for s in streams[:8]]  # some are decoding, most still queued
        for s in streams:
            await s.aclose()  # the client goes away: the request is aborted
        await asyncio.sleep(0.5)
        return firsts

    firsts = loop.run_until_complete(run())
    assert all(f.outputs for f in firsts)
    assert loop.run_until_complete(slots_in_use(eng)) == 0


def test_requests_beyond_capacity_queue_and_all_finish(engine):
    eng, loop = engine

    async def run():
        return await asyncio.gather(*[collect(eng, PROMPTS[i % 4], GREEDY) for i in range(20)])

    results = loop.run_until_complete(run())  # 20 requests, 8 slots
    assert all(
        merged(r)[0]["reason"] == "length" and len(merged(r)[0]["tokens"]) == 8 for r in results
    )


def test_streamed_deltas_add_up_to_the_decoded_output(engine):
    eng, loop = engine
    tok = eng.tokenizer
    prompt = tok("café 東京 🙂").input_ids
    outs = loop.run_until_complete(
        collect(eng, prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=3))
    )
    assert len(outs) > 2  # it streamed
    full = "".join(o.outputs[0].text for o in outs if o.outputs)
    tokens = [t for o in outs for c in o.outputs for t in c.token_ids]
    assert full == tok.decode(tokens, skip_special_tokens=True)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason in ("stop", "length")


def test_stop_strings_end_the_text_before_the_stop(engine):
    eng, loop = engine
    full = merged(loop.run_until_complete(collect(eng, PROMPTS[0], GREEDY)))[0]["text"]
    stop = full[3:6]
    out = merged(
        loop.run_until_complete(
            collect(eng, PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, stop=[stop]))
        )
    )[0]
    assert out["reason"] == "stop" and out["text"] == full[: full.index(stop)]


def test_logprobs_and_prompt_logprobs(engine, tiny_ckpt):
    import torch

    from tests.conftest import hf_model

    eng, loop = engine
    outs = loop.run_until_complete(
        collect(
            eng,
            PROMPTS[2],
            SamplingParams(max_tokens=2, temperature=0, logprobs=3, prompt_logprobs=1),
        )
    )
    final = outs[-1]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(tiny_ckpt)(torch.tensor([PROMPTS[2]])).logits[0], -1)
    assert final.prompt_logprobs[0] is None and len(final.prompt_logprobs) == len(PROMPTS[2])
    for i, entry in enumerate(final.prompt_logprobs[1:], start=1):
        assert entry[PROMPTS[2][i]] == pytest.approx(float(ref[i - 1, PROMPTS[2][i]]), abs=1e-4)
    first = outs[0].outputs[0].logprobs[0]
    assert len(first) in (3, 4)  # sampled token + top-3 (the sampled one is usually among them)


SAMPLING_MIX = [
    SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=11, logprobs=1),
    SamplingParams(max_tokens=8, temperature=0.7, top_k=5, min_p=0.05, seed=12),
    SamplingParams(
        max_tokens=8,
        temperature=1.0,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        seed=13,
    ),
    SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=14),  # forks sampled on the same row
    SamplingParams(max_tokens=6, min_tokens=4, stop_token_ids=[7, 9], temperature=1.0, seed=15),
    SamplingParams(
        max_tokens=3, temperature=0.8, seed=16, prompt_logprobs=1
    ),  # logits still travel
]


def test_a_mix_of_sampling_parameters_in_one_batch_is_each_honoured_on_the_last_stage(engine):
    """Tokens and logprobs come back from the last stage; logits never travel."""
    eng, loop = engine
    before = loop.run_until_complete(eng.stats())

    async def run():
        return await asyncio.gather(
            *(collect(eng, PROMPTS[i % 4], p) for i, p in enumerate(SAMPLING_MIX))
        )

    results = [merged(r) for r in loop.run_until_complete(run())]
    after = loop.run_until_complete(eng.stats())
    assert [len(r) for r in results] == [1, 1, 1, 1, 3, 1, 1]
    assert len(results[0][0]["tokens"]) == 6  # ignore_eos: runs to max_tokens
    for r, p in zip(results, SAMPLING_MIX):
        assert all(len(o["tokens"]) <= p.max_tokens for o in r)
    stop = results[5][0]["tokens"]
    assert len(stop) >= 4 and not set(stop[:4]) & {7, 9, 2}  # min_tokens bans stops and EOS first
    assert stop[-1] in (7, 9, 2) or len(stop) == 6
    sampled = after["stages"][-1]["sampled_rows"] - before["stages"][-1]["sampled_rows"]
    generated = after["generated_tokens"] - before["generated_tokens"]
    assert sampled == generated > 0 and after["stages"][0]["sampled_rows"] == 0
    assert after["slots_in_use"] == 0


def test_invalid_requests_raise_before_scheduling(engine):
    eng, loop = engine

    async def bad(prompt, params):
        await eng.generate(prompt, params)

    with pytest.raises(InvalidRequestError, match="maximum context length"):
        loop.run_until_complete(bad(PROMPTS[0], SamplingParams(max_tokens=1000)))
    with pytest.raises(InvalidRequestError, match="params must be"):
        loop.run_until_complete(bad(PROMPTS[0], {"max_tokens": 3}))
    assert loop.run_until_complete(slots_in_use(eng)) == 0


def test_stages_overlap_on_consecutive_micro_batches(engine):
    eng, loop = engine
    import ray

    many = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def run():
        await asyncio.gather(*[collect(eng, PROMPTS[i % 4], many) for i in range(8)])

    loop.run_until_complete(run())
    t0, t1 = (ray.get(s.get_trace.remote()) for s in eng.core.pipeline.stages)
    overlaps = sum(1 for _, a0, a1 in t0[-100:] for _, b0, b1 in t1[-100:] if a0 < b1 and b0 < a1)
    assert overlaps > 0, "stage 0 never worked while stage 1 did"


def test_streams_get_each_token_as_it_is_made_on_the_in_process_backend(tiny_ckpt):
    """A step of the local backend never awaits; the step loop must still yield between steps,
    or a stream reads its first token only once the whole request has run."""

    async def first_delta_while_running():
        eng = AsyncEngine(config(tiny_ckpt, backend="local"))
        try:
            async for out in await eng.generate([1, 5, 9], GREEDY, "r"):
                return len(out.outputs[0].token_ids), eng.core.has_work()  # still running?
        finally:
            eng.shutdown()

    assert asyncio.run(first_delta_while_running()) == (1, True)


def test_the_serve_reports_work_with_every_option_at_its_default(tiny_ckpt):
    """Autoscaling on slots, blocks or waiting prefill reads these; with `max_batched_tokens` left
    to its device default (None in the config) they raised, and every replica reported nothing."""
    from jamba_ray.serve.engine_hooks import EngineReports

    async def reports():
        reports = EngineReports()
        reports.engine = AsyncEngine(EngineConfig.build(str(tiny_ckpt), backend="local"))
        try:
            return await reports.record_autoscaling_stats(), await reports.record_routing_stats()
        finally:
            reports.engine.shutdown()

    fill, routing = asyncio.run(reports())
    assert fill["prefill_tokens_capacity"] == 2048  # the CPU default
    assert fill["slots"] == 0 and fill["slots_capacity"] > 0 and "load" in routing


def test_concurrent_health_probes_share_one_probe_step(tiny_ckpt):
    """Serve's check, each ingress's /health and gRPC Health can probe at once; a compiled graph
    takes only a few executions beyond the steps in flight, so they share the one in flight."""

    async def probes():
        eng = AsyncEngine(config(tiny_ckpt, backend="local"))
        sent, probe = [], eng.core.pipeline.probe
        eng.core.pipeline.probe = lambda tok: sent.append(tok) or probe(tok)
        try:
            got = await asyncio.gather(*(eng.health() for _ in range(5)))
            again = await eng.health()  # the shared one is done: a new probe
            return [g["status"] for g in got] + [again["status"]], len(sent)
        finally:
            eng.shutdown()

    statuses, sent = asyncio.run(probes())
    assert statuses == ["ok"] * 6 and sent == 2
