"""Scheduler and slot bookkeeping: pure Python, no torch or ray."""

import subprocess
import sys

import pytest

from jamba_ray.config.engine_config import SchedulerConfig
from jamba_ray.engine.kv_cache import KVCache
from jamba_ray.engine.scheduler import Scheduler
from jamba_ray.engine.sequence import Sequence
from jamba_ray.engine.slots import SlotAllocator


def scheduler(slots, micro_batches=1, blocks=64, block_size=4, checkpoints=0, **kw):
    kv = KVCache(blocks, block_size, checkpoints, checkpoint_every=8)
    return Scheduler(SchedulerConfig(max_num_seqs=slots, **kw).on("cpu"), slots, kv, micro_batches)


def seq(i, prompt_len=4, n=1, rid=None):
    s = Sequence(i, rid or f"r{i}", 0, list(range(1, prompt_len + 1)), params=None, seed=0)
    s.forks = [
        Sequence(100 + i * 10 + k, s.request_id, k, s.prompt_ids, None, 0) for k in range(1, n)
    ]
    return s


def land(s: Scheduler, mb, sample=7):
    """What the engine does when a micro-batch returns: advance, and sample where a segment says."""
    for seg, q in zip(mb.message.segments, mb.seqs):
        s.landed(q, seg)
        if seg.samples:
            s.append(q, sample)


def test_bookkeeping_modules_import_neither_torch_nor_ray():
    code = (
        "import sys; import jamba_ray.engine.scheduler, jamba_ray.engine.slots, "
        "jamba_ray.engine.sampling_params, jamba_ray.engine.output_processor, "
        "jamba_ray.config.planner, jamba_ray.config.capacity, jamba_ray.config.pipeline_file; "
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slots_are_reused_and_double_free_is_caught():
    a = SlotAllocator(2)
    x, y = a.allocate(2)
    assert not a.can_allocate()
    a.free([x])
    assert a.allocate() == [x]
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free([y, y])


def test_requests_wait_for_free_slots_and_start_when_one_frees():
    s = scheduler(2)
    seqs = [seq(i) for i in range(3)]
    for q in seqs:
        s.add(q)
    mb = s.schedule()
    assert [q.seq_id for q in mb.seqs] == [0, 1] and s.num_waiting == 1
    land(s, mb)
    s.finish(seqs[0], "stop")
    mb = s.schedule()
    assert 2 in [q.seq_id for q in mb.seqs] and seqs[2].slot == 0


def test_long_prompts_are_chunked_by_the_token_budget_and_interleave_with_decode():
    s = scheduler(4, max_batched_tokens=5)
    short, long = seq(0, prompt_len=2), seq(1, prompt_len=12)
    s.add(short)
    s.add(long)
    mb = s.schedule()
    assert [(g.start, g.length, g.logits) for g in mb.message.segments] == [
        (0, 2, "last"),
        (0, 3, "none"),
    ]
    land(s, mb)
    mb = s.schedule()  # the short one decodes while the long one keeps prefilling
    assert [(g.seq_id, g.start, g.length) for g in mb.message.segments] == [(0, 2, 1), (1, 3, 4)]
    land(s, mb)
    mb = s.schedule()
    assert [(g.seq_id, g.start, g.length, g.logits) for g in mb.message.segments] == [
        (0, 3, 1, "last"),
        (1, 7, 4, "none"),
    ]
    land(s, mb)
    mb = s.schedule()
    assert mb.message.segments[1].logits == "last" and mb.message.segments[1].length == 1


def test_micro_batches_split_decoding_sequences_across_stages():
    s = scheduler(8, 2)
    seqs = [seq(i, prompt_len=1) for i in range(6)]
    for q in seqs:
        s.add(q)
    land(s, s.schedule())  # all six prefills fit in one micro-batch
    first, second = s.schedule(), s.schedule()
    assert len(first.seqs) == 3 and len(second.seqs) == 3
    assert not {q.seq_id for q in first.seqs} & {q.seq_id for q in second.seqs}
    assert s.schedule() is None  # everything is in flight


def test_n_samples_reserve_their_slots_and_join_after_prefill():
    s = scheduler(3)
    parent = seq(0, n=3)
    s.add(parent)
    mb = s.schedule()
    assert len(mb.seqs) == 1 and s.slots.num_used == 3
    assert mb.message.segments[0].samples == (101, 102, 0)  # the forks draw from the same row
    assert {i.seq_id for i in mb.message.admitted} == {0, 101, 102}  # registered once, up front
    land(s, mb)
    forks = s.start_forks(parent)
    assert [f.num_computed for f in forks] == [4, 4] and len(s.running) == 3
    nxt = s.schedule()  # the state copy rides in the next message, before any fork's segment
    assert [(f.src, f.dsts) for f in nxt.message.forks] == [(0, (1, 2))]
    # the forks share the parent's full block and copy its partial one (4 tokens, blocks of 4:
    # one full block, nothing partial)
    assert s.kv.table(forks[0].seq_id) == s.kv.table(parent.seq_id)[:1]
    assert nxt.message.copies == ()
    assert nxt.message.admitted == ()


def test_abort_frees_at_once_unless_in_flight():
    s = scheduler(4)
    a, b, c = seq(0), seq(1), seq(2)
    for q in (a, b):
        s.add(q)
    mb = s.schedule()
    s.add(c)
    assert s.abort("r2") == [c] and s.num_waiting == 0 and c.finish_reason == "abort"
    assert (
        s.abort("r0") == [a] and a.aborted and s.slots.num_used == 2
    )  # in flight: held until it lands
    land(s, mb)
    s.finish(a, "abort")
    assert s.slots.num_used == 1 and s.schedule().message.finished == (
        0,
    )  # the last stage forgets it


def test_a_suspect_sequence_runs_alone_until_its_known_tokens_ran():
    s = scheduler(4, max_batched_tokens=8)
    a, b = seq(0, prompt_len=3), seq(1, prompt_len=3)
    s.add(a)
    s.add(b)
    land(s, s.schedule())
    s.replay([a, b], suspect=True)
    assert not a.registered and a.num_computed == 0
    first = s.schedule()
    assert first.seqs == [a] and first.message.admitted[0].seq_id == 0
    assert first.message.admitted[0].output_ids == (7,)  # the last stage gets the tokens so far
    land(s, first)
    assert not a.suspect  # it caught up: it batches with others again
    assert s.schedule().seqs == [b]


def test_lower_priority_values_are_admitted_first_then_arrival_order():
    from types import SimpleNamespace

    s = scheduler(1)
    first, urgent, later = seq(0), seq(1), seq(2)
    first.params, urgent.params, later.params = (SimpleNamespace(priority=p) for p in (0, -5, 0))
    for q in (first, urgent, later):
        s.add(q)
    assert list(s.waiting) == [urgent, first, later]
    assert s.schedule().seqs == [urgent]
