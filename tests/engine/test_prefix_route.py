"""Prefix-aware routing as a specification: what a replica reports, what a router computes from
a request's token ids, and which replica it prefers. Pure Python, against a real KVCache and
Scheduler that ran prompts."""

import random

import pytest

from jamba_ray.config.engine_config import SchedulerConfig
from jamba_ray.engine.kv_cache import KVCache
from jamba_ray.engine.prefix_rank import Candidate, Recent, rank, report_source, reusable
from jamba_ray.engine.prefix_report import PrefixReport, RequestKeys, build_report
from jamba_ray.engine.sampling_params import SamplingParams
from jamba_ray.engine.scheduler import Scheduler
from jamba_ray.engine.sequence import Sequence

BS, EVERY = 4, 8


class Replica:
    """One engine's bookkeeping that ran some prompts to the end of their prefill."""

    def __init__(self, blocks=256, checkpoints=32):
        self.kv = KVCache(blocks, BS, checkpoints, checkpoint_every=EVERY)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=4).on("cpu"), 4, self.kv, 1)
        self.n = 0

    def run(self, prompt, salt=None, finish=True):
        params = SamplingParams(max_tokens=1, cache_salt=salt)
        s = Sequence(self.n, f"r{self.n}", 0, list(prompt), params=params, seed=0)
        self.n += 1
        self.sched.add(s)
        while s.in_prefill or s.num_computed == 0:
            mb = self.sched.schedule()
            for seg, q in zip(mb.message.segments, mb.seqs):
                self.sched.landed(q, seg)
                if seg.samples:
                    self.sched.append(q, 7)
        if finish:
            self.sched.finish(s, "length")
        return s

    def report(self, limit=4096):
        return build_report(self.kv, self.sched, limit)

    def engine_match(self, prompt, salt=None):
        from jamba_ray.engine.blocks import root_key

        m = self.kv.prefix.match(list(prompt), root_key(salt))
        return 0 if m is None else m.checkpoint.length


SYSTEM = list(range(100, 123))  # 23 tokens: 5 full blocks, checkpoints at 8, 16 and 23


def test_a_router_computes_from_token_ids_what_the_engine_would_resume():
    r = Replica()
    r.run(SYSTEM + [1, 2, 3])
    rep = r.report()
    rng = random.Random(0)
    prompts = [SYSTEM + [9] * k for k in range(6)] + [SYSTEM[:n] for n in range(1, 24)]
    prompts += [SYSTEM + [1, 2, 3, 4], SYSTEM + [1, 2, 3], [5] + SYSTEM]
    prompts += [[rng.randrange(100, 124) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    for p in prompts:
        assert reusable(RequestKeys(p, BS), [report_source(rep)]) == r.engine_match(p), p


def test_cache_salts_never_match_each_other_or_the_unsalted():
    r = Replica()
    r.run(SYSTEM + [1], salt="alice")
    rep = r.report()
    asked = SYSTEM + [2, 3]  # the first prompt's checkpoint at its last token covers SYSTEM
    assert reusable(RequestKeys(asked, BS, "alice"), [report_source(rep)]) == len(SYSTEM)
    assert reusable(RequestKeys(asked, BS, "bob"), [report_source(rep)]) == 0
    assert reusable(RequestKeys(asked, BS), [report_source(rep)]) == 0


def test_the_report_travels_as_a_dict_and_reports_load():
    r = Replica()
    r.run(SYSTEM)
    r.run(SYSTEM + [1] * 9, finish=False)  # one running, holding a slot
    r.sched.add(Sequence(99, "w", 0, list(range(30)), SamplingParams(), 0))
    rep = r.report()
    assert PrefixReport.from_dict(rep.to_dict()) == rep
    assert rep.load.slots_in_use == 1 and rep.load.waiting_requests == 1
    assert rep.load.waiting_prefill_tokens == 30 and rep.load.ongoing == 2
    assert 0 < rep.load.kv_blocks_in_use < rep.load.kv_blocks_total
    assert rep.prefix_hits == 23  # the second prompt resumed at the first one's end


def test_reports_are_bounded_to_the_most_recently_used():
    r = Replica()
    r.run(SYSTEM)
    r.run(list(range(500, 523)))
    rep = r.report(limit=3)
    assert len(rep.blocks) == 3 and len(rep.checkpoints) == 3
    newest = RequestKeys(list(range(500, 523)) + [1], BS)
    assert set(newest.digests[2:5]) == set(rep.blocks)  # released last, evicted last
    assert reusable(newest, [report_source(rep)]) == 0  # its first blocks fell out of the report


def cand(name, load, *reports):
    return Candidate(name, load, [report_source(r) for r in reports])


def test_the_longest_reusable_prefix_wins_within_the_threshold_else_the_least_loaded():
    holder, other = Replica(), Replica()
    holder.run(SYSTEM + [1])
    req = RequestKeys(SYSTEM + [2], BS)
    h, o = holder.report(), other.report()
    assert rank(req, [cand("o", 0, o), cand("h", 0, h)], threshold=2) == ["h", "o"]
    assert rank(req, [cand("o", 0, o), cand("h", 2, h)], threshold=2) == ["h", "o"]
    assert rank(req, [cand("o", 0, o), cand("h", 3, h)], threshold=2) == ["o", "h"]  # overloaded
    # a shorter holder within the threshold beats an overloaded longer one
    short = Replica()
    short.run(SYSTEM[:9])
    s = short.report()
    three = [cand("o", 0, o), cand("h", 5, h), cand("s", 1, s)]
    assert rank(req, three, threshold=2) == ["s", "o", "h"]


@pytest.mark.parametrize("prompt", [SYSTEM[:4], SYSTEM[:2], []])
def test_prompts_shorter_than_a_block_and_no_match_route_by_load(prompt):
    holder = Replica()
    holder.run(SYSTEM)
    h = holder.report()
    req = RequestKeys(prompt, BS)
    assert rank(req, [cand("h", 1, h), cand("o", 0)], threshold=9) == ["o", "h"]
    assert rank(RequestKeys([7] * 20, BS), [cand("h", 1, h), cand("o", 0)], 9) == ["o", "h"]
    assert rank(None, [cand("h", 1, h), cand("o", 0)], threshold=9) == ["o", "h"]


def test_requests_routed_since_the_last_report_count_until_they_expire():
    recent = Recent(ttl_s=5.0)
    recent.note("a", RequestKeys(SYSTEM + [1], BS), EVERY, now=100.0)
    req = RequestKeys(SYSTEM + [2], BS)
    # as the engine will: checkpoints every EVERY tokens of the prompt, after all but its last
    # token (23: the whole shared SYSTEM) and at its end
    assert reusable(req, recent.sources("a", now=101.0)) == 23
    assert (
        rank(req, [Candidate("b", 0), Candidate("a", 1, recent.sources("a", 101.0))], 1)[0] == "a"
    )
    assert recent.sources("a", now=105.0) == []
    recent.note("a", RequestKeys(SYSTEM + [1], BS), EVERY, now=200.0)
    assert reusable(RequestKeys(SYSTEM + [1, 5], BS), recent.sources("a", 201.0)) == 24  # its end
    # an exact repeat resumes one token short of the end (the engine emits a checkpoint there)
    assert reusable(RequestKeys(SYSTEM + [1], BS), recent.sources("a", 201.0)) == 23


def test_a_checkpoint_whose_full_blocks_were_evicted_counts_for_nothing():
    r = Replica(blocks=9)
    r.run(SYSTEM + [1, 2, 3])
    r.run(list(range(500, 526)))  # evicts the first prompt's idle full blocks
    rep = r.report()
    assert len(rep.checkpoints) > 3  # the first prompt's checkpoints are still listed
    for p in (SYSTEM + [9], SYSTEM[:17], list(range(500, 520))):
        assert reusable(RequestKeys(p, BS), [report_source(rep)]) == r.engine_match(p), p
    assert r.engine_match(SYSTEM + [9]) == 0
