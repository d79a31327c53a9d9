"""Per-sequence state, end to end: whatever forks, resumes, aborts and preemptions do to blocks and
checkpoints, each sampled token's logprob is what a cold engine computes for the same tokens
(teacher forcing), and once idle only the checkpoints hold KV blocks.

Only public behaviour is read: `EngineCore.add_request/step/abort/stats_local`, the outputs, and
`LLM.score` on a cold engine (prefix caching off) as the oracle. Stages run in-process (`local`).
Logprobs agree within 1e-4: the cold engine prefills what the warm one decoded token by token, so
fp32 sums run in another order (~1e-6); a sequence reading another's KV is off by ~1e-2 or more.
"""

from dataclasses import dataclass, field

import pytest

from jamba_ray.config import EngineConfig
from jamba_ray.engine.core import EngineCore
from jamba_ray.engine.llm import LLM
from jamba_ray.engine.sampling_params import SamplingParams

BLOCK = 4
ATOL = 1e-4  # fp32 summation order (see the module docstring)
SYSTEM = [1] + [(7 * i) % 400 + 50 for i in range(37)]  # 38 tokens: 2 past a block boundary
ALIGNED = SYSTEM[:36]  # 36 tokens: whole blocks


LOCAL = dict(
    num_stages=2,
    backend="local",
    max_num_seqs=6,
    max_model_len=128,
    max_batched_tokens=16,
    block_size=BLOCK,
    checkpoint_every=6,
)


def engine(path, **kw) -> EngineCore:
    return EngineCore(EngineConfig.build(path, **{**LOCAL, **kw}))


@pytest.fixture(scope="module")
def cold(tiny_ckpt):
    """The oracle: no prefix cache, so no block or checkpoint is ever shared or restored."""
    llm = LLM(tiny_ckpt, num_stages=1, backend="local", enable_prefix_caching=False)
    yield llm
    llm.shutdown()


@dataclass
class Got:
    """One request's samples as they streamed: index -> tokens / their logprobs."""

    prompt: list[int]
    tokens: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[float]] = field(default_factory=dict)
    cached: int = 0
    finished: bool = False

    def sink(self, out):
        assert not isinstance(out, BaseException), out
        self.cached, self.finished = out.num_cached_tokens, out.finished
        for o in out.outputs:
            self.tokens.setdefault(o.index, []).extend(o.token_ids)
            lps = [d[t] for t, d in zip(o.token_ids, o.logprobs or [])]
            self.logprobs.setdefault(o.index, []).extend(lps)


def add(eng: EngineCore, rid: str, prompt: list[int], params: SamplingParams) -> Got:
    got = Got(prompt)
    eng.add_request(rid, prompt, params, got.sink)
    return got


def drain(eng: EngineCore) -> None:
    while eng.has_work():
        eng.step()


def sampled(n=1, seed=0, max_tokens=8, **kw) -> SamplingParams:
    return SamplingParams(
        n=n, seed=seed, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0, **kw
    )


def assert_teacher_forced(cold: LLM, got: Got) -> None:
    """Every sample's logprobs are the cold engine's for prompt + that sample's tokens."""
    for i, tokens in got.tokens.items():
        (scored,) = cold.score([got.prompt + tokens])
        want = scored["token_logprobs"][len(got.prompt) - 1 :]  # (they start at token 1)
        assert len(want) == len(tokens) == len(got.logprobs[i])
        assert got.logprobs[i] == pytest.approx(want, abs=ATOL), f"sample {i}: {tokens}"


def assert_at_baseline(eng: EngineCore) -> None:
    """Idle: every slot free, and the only KV blocks in use are the checkpoints' tail blocks."""
    s = eng.stats_local()
    assert s["slots_in_use"] == 0 and s["requests_running"] == s["requests_waiting"] == 0
    assert s["kv_blocks_in_use"] == s["kv_blocks_held_by_checkpoints"], s


# ---- forks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [SYSTEM, ALIGNED], ids=["mid-block", "block-aligned"])
def test_sampled_forks_each_score_as_a_cold_engine_and_give_back_their_blocks(
    tiny_ckpt, cold, prompt
):
    """n=4 seeded samples fork one prefill: each writes its own tokens after the prompt, into a
    copy of the prompt's partial last block (or into fresh blocks when the prompt fills its last
    one: the block reserved for the copy is then given back)."""
    eng = engine(tiny_ckpt)
    got = add(eng, "forked", prompt, sampled(n=4, seed=7))
    drain(eng)
    assert eng.stats_local()["forks"] == 3
    assert len({tuple(t[:1]) for t in got.tokens.values()}) > 1  # they diverge at once
    assert_teacher_forced(cold, got)
    assert_at_baseline(eng)


# ---- resumes -----------------------------------------------------------------------------------
def test_concurrent_resumes_from_one_mid_block_checkpoint_each_score_as_a_cold_engine(
    tiny_ckpt, cold
):
    """Four requests resume at once from the checkpoint at the end of SYSTEM (38 tokens: its tail
    block holds positions 36-39), each with its own next token and seed: each must write into its
    own copy of that tail block."""
    eng = engine(tiny_ckpt)
    add(eng, "warm", SYSTEM, sampled(max_tokens=1))
    drain(eng)
    base = eng.stats_local()["kv_blocks_held_by_checkpoints"]
    assert base > 0  # the checkpoint at 38 holds its tail block
    gots = [add(eng, f"r{i}", SYSTEM + [60 + i], sampled(seed=i)) for i in range(4)]
    drain(eng)
    assert [g.cached for g in gots] == [len(SYSTEM)] * 4  # all resumed from that checkpoint
    for g in gots:
        assert_teacher_forced(cold, g)
    assert_at_baseline(eng)


def test_forks_of_a_resumed_prompt_score_as_a_cold_engine(tiny_ckpt, cold):
    """Resume and fork together: n=3 from the mid-block checkpoint, twice at once."""
    eng = engine(tiny_ckpt)
    add(eng, "warm", SYSTEM, sampled(max_tokens=1))
    drain(eng)
    gots = [add(eng, f"r{i}", SYSTEM + [70], sampled(n=3, seed=10 + i)) for i in range(2)]
    drain(eng)
    for g in gots:
        assert g.cached == len(SYSTEM)
        assert_teacher_forced(cold, g)
    assert_at_baseline(eng)


def test_checkpoints_that_share_a_tail_block_count_it_once(tiny_ckpt):
    """The end-of-prompt checkpoint (38) and the finished sequence's last state (39) both hold the
    block of positions 36-39: once idle, that one block is all they hold beyond the others'."""
    eng = engine(tiny_ckpt)
    add(eng, "short", SYSTEM, sampled(max_tokens=2))
    drain(eng)
    assert_at_baseline(eng)


# ---- aborts ------------------------------------------------------------------------------------
def test_aborts_at_every_point_of_a_requests_life_give_back_every_block(tiny_ckpt, cold):
    """Aborted while queued, mid-prefill, in flight, decoding, and forked: once the engine is
    idle the blocks in use are the checkpoints' again, and the requests left alone still score
    as a cold engine would."""
    eng = engine(tiny_ckpt)  # six slots
    long = SYSTEM + list(range(100, 140))  # 78 tokens: five prefill chunks
    kept = add(eng, "kept", SYSTEM + [61], sampled(n=2, seed=3, max_tokens=12))
    doomed = [("mid-prefill", long, 1), ("decoding", SYSTEM, 1), ("forked", SYSTEM, 2)]
    for rid, prompt, n in doomed:
        add(eng, rid, prompt + [62], sampled(n=n, seed=4, max_tokens=40))
    add(eng, "queued", SYSTEM, sampled(n=2, max_tokens=40))  # the slots are taken: it waits
    eng.step()
    assert eng.stats_local()["requests_waiting"] == 1
    eng.abort("queued")
    eng.step()
    eng.abort("mid-prefill")  # (two stages: one of its chunks may still be in flight)
    for _ in range(6):
        eng.step()
    eng.abort("decoding")
    eng.abort("forked")
    drain(eng)
    assert kept.finished and eng.stats_local()["finished_requests"] == 5
    assert_teacher_forced(cold, kept)
    assert_at_baseline(eng)


# ---- preemption --------------------------------------------------------------------------------
@pytest.mark.parametrize("low_starts_first", [False, True], ids=["queued-together", "low-first"])
def test_the_lowest_priority_is_preempted_whoever_runs_out_of_blocks(
    tiny_ckpt, cold, low_starts_first
):
    """Blocks run out while three requests decode: the one with the lowest priority (the highest
    value) is preempted, though it arrived first, and also when it is the one short of a block
    (started a step earlier, it asks first). The others receive a token every step until they
    finish; only the preempted one stalls, and it samples on from its recomputed state as a cold
    engine would."""
    eng = engine(
        tiny_ckpt, num_stages=1, max_model_len=32, num_kv_blocks=20, enable_prefix_caching=False
    )
    prompt = [1, 5, 9, 200, 3, 77, 12]  # 7 tokens: 2 blocks each at admission, 8 at the end
    gots = {"low": add(eng, "low", prompt, sampled(seed=1, max_tokens=24, priority=1))}
    if low_starts_first:
        eng.step()
    for i in range(2):
        gots[f"urgent{i}"] = add(eng, f"urgent{i}", prompt, sampled(seed=2 + i, max_tokens=24))
    stalls = dict.fromkeys(gots, 0)
    seen = dict.fromkeys(gots, 0)
    while eng.has_work():
        eng.step()
        for rid, got in gots.items():
            n = len(got.tokens.get(0, []))
            stalls[rid] += 0 < seen[rid] == n < 24  # a step without a token since its first
            seen[rid] = n
    assert eng.stats_local()["preemptions"] > 0
    assert stalls["urgent0"] == stalls["urgent1"] == 0 and stalls["low"] > 0, stalls
    assert_teacher_forced(cold, gots["low"])
    assert_at_baseline(eng)
