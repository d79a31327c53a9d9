"""KV blocks, prefix checkpoints and preemption: pure bookkeeping, tested in milliseconds."""

import pytest

from jamba_ray.config.engine_config import SchedulerConfig
from jamba_ray.engine.blocks import UNSALTED, BlockAllocator, block_keys, root_key
from jamba_ray.engine.kv_cache import KVCache
from jamba_ray.engine.prefix import PrefixCache
from jamba_ray.engine.scheduler import Scheduler
from jamba_ray.engine.sequence import Sequence


def test_blocks_are_refcounted_and_a_double_free_is_caught():
    a = BlockAllocator(3, block_size=4)
    x, y = a.allocate(2)
    a.share(x)
    a.free([x])
    assert a.num_free == 1  # still held once
    a.free([x, y])
    assert a.num_free == 3
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free([y])


def test_freed_hashed_blocks_stay_cached_until_their_memory_is_needed():
    a = BlockAllocator(2, block_size=4)
    x, y = a.allocate(2)
    a.commit(x, b"k111")
    a.free([x, y])
    assert a.lookup(b"k111") == x and a.num_free == 2 and a.num_cached == 1
    first, second = a.allocate(2)  # the plain free block goes first, then the cached one
    assert (first, second) == (y, x) and a.lookup(b"k111") is None


def test_block_keys_chain_so_equal_keys_mean_equal_prefixes():
    same = block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4)
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == same
    assert block_keys([9, 2, 3, 4, 5, 6, 7, 8], 4)[1] != same[1]  # second block, other parent
    assert all(len(k) == 32 for k in same)  # SHA-256 digests, not Python's hash()


def test_a_cache_salt_gives_a_prompt_other_keys_from_its_first_block_on():
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    plain, salted = block_keys(tokens, 4), block_keys(tokens, 4, root=root_key("tenant-a"))
    assert not set(plain) & set(salted)
    assert block_keys(tokens, 4, root=root_key("tenant-a")) == salted  # same salt, same keys
    assert block_keys(tokens, 4, root=root_key("tenant-b"))[0] != salted[0]
    assert root_key(None) == UNSALTED


def prefix_cache(blocks=16, bs=4, checkpoints=4) -> tuple[BlockAllocator, PrefixCache]:
    alloc = BlockAllocator(blocks, bs)
    return alloc, PrefixCache(alloc, checkpoints)


def commit_all(alloc: BlockAllocator, tokens: list[int]) -> list[int]:
    blocks = alloc.allocate(-(-len(tokens) // alloc.block_size))
    for b, h in zip(blocks, block_keys(tokens, alloc.block_size)):
        alloc.commit(b, h)
    return blocks


def save(cache: PrefixCache, tokens: list[int], length: int, tail_block):
    """What KVCache.save does: a catalog entry, the tail held, the evicted one's released."""
    bs = cache.blocks.block_size
    full = length // bs
    chain = block_keys(tokens, bs, full * bs)[-1] if full else UNSALTED
    cp, evicted = cache.add(chain, tuple(tokens[full * bs : length]), length, tail_block)
    if cp is not None and cp.tail_block is not None:
        cache.blocks.share(cp.tail_block)
    if evicted is not None and evicted.tail_block is not None:
        cache.blocks.free([evicted.tail_block])
    return cp


def test_a_prompt_resumes_from_the_longest_checkpoint_at_an_exact_position():
    alloc, cache = prefix_cache()
    system = list(range(10, 20))  # 10 tokens: two full blocks and a tail of 2
    blocks = commit_all(alloc, system)
    assert save(cache, system, 10, tail_block=blocks[2]).ckpt == 0
    assert save(cache, system, 8, tail_block=None).ckpt == 1
    match = cache.match(system + [7, 7])
    assert match.checkpoint.length == 10 and match.blocks == blocks[:2]
    assert match.checkpoint.tail_block == blocks[2] and alloc.refs(blocks[2]) == 2  # held
    assert cache.match(system[:9] + [5, 5]).checkpoint.length == 8  # the tail differs
    assert cache.match(system).checkpoint.length == 8  # one token must be left to run
    assert cache.hits == 10 + 8 + 8 and cache.queries == 12 + 11 + 10


def test_a_checkpoint_whose_blocks_were_evicted_is_not_used():
    alloc, cache = prefix_cache(blocks=3)
    tokens = list(range(12))
    blocks = commit_all(alloc, tokens)
    save(cache, tokens, 8, tail_block=None)
    alloc.free(blocks)
    alloc.allocate(3)  # all three cached blocks are taken for other work
    assert cache.match(tokens) is None


def test_checkpoints_are_evicted_least_recently_used_and_release_their_tail():
    alloc, cache = prefix_cache(checkpoints=1)
    a, b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    tail_a = commit_all(alloc, a)[1]
    save(cache, a, 5, tail_a)
    commit_all(alloc, b)
    save(cache, b, 4, None)  # the only checkpoint slot: a's checkpoint goes
    assert cache.match(a + [0]) is None and alloc.refs(tail_a) == 1


def test_a_checkpoint_that_served_a_resume_outlives_ones_that_never_did():
    """Segmented LRU: the checkpoint prompts share (hit) stays while one-off prompt ends (never
    hit) come and go, even when the shared one is the least recently used."""
    alloc, cache = prefix_cache(blocks=32, checkpoints=4)
    shared = [1, 2, 3, 4]
    commit_all(alloc, shared)
    save(cache, shared, 4, None)
    assert cache.match(shared + [9]).checkpoint.length == 4  # it served a resume
    for i in range(6):  # six one-off ends, each pushing out the oldest of the others
        own = shared + [20 + i, 21 + i, 22 + i, 23 + i]
        commit_all(alloc, own)
        save(cache, own, 8, None)
    assert cache.match(shared + [9]).checkpoint.length == 4
    assert cache.num_checkpoints == 4


def test_checkpoints_that_served_a_resume_are_evicted_once_they_fill_the_protected_share():
    alloc, cache = prefix_cache(blocks=64, checkpoints=4)
    prompts = [[10 * p + t for t in range(1, 5)] for p in range(1, 5)]
    for tokens in prompts:  # four checkpoints, every one of them used
        commit_all(alloc, tokens)
        save(cache, tokens, 4, None)
        assert cache.match(tokens + [0]) is not None
    new = [90, 91, 92, 93]
    commit_all(alloc, new)
    save(cache, new, 4, None)  # all used (> 3/4): plain LRU, the oldest goes
    assert cache.match(prompts[0] + [0]) is None and cache.match(prompts[1] + [0]) is not None


def test_clearing_the_cache_frees_the_indices_reserved_for_emits_in_flight():
    """The engine drops what was in flight after an unexpected error (`kv.clear()`): those
    messages never land, so their reserved indices must be free again, not lost."""
    alloc, cache = prefix_cache(checkpoints=2)
    assert cache.reserve() is not None and cache.reserve() is not None
    assert cache.reserve() is None and cache.num_reserved == 2
    cache.clear()
    assert cache.num_reserved == 0
    assert cache.reserve() is not None and cache.reserve() is not None


def seq(i, prompt, n=1) -> Sequence:
    s = Sequence(i, f"r{i}", 0, list(prompt), params=None, seed=0)
    s.forks = [
        Sequence(100 + i * 10 + k, s.request_id, k, s.prompt_ids, None, 0) for k in range(1, n)
    ]
    return s


def land(s: Scheduler, mb, sample=7):
    for seg, q in zip(mb.message.segments, mb.seqs):
        s.landed(q, seg)
        if seg.samples:
            s.append(q, sample)


def sched(blocks, checkpoints=4, slots=4, every=8, budget=64) -> Scheduler:
    kv = KVCache(blocks, 4, checkpoints, checkpoint_every=every)
    return Scheduler(SchedulerConfig(max_num_seqs=slots, max_batched_tokens=budget), slots, kv)


def test_segments_carry_only_the_table_entries_the_stages_lack():
    s = sched(blocks=16)
    a = seq(0, range(1, 7))  # 6 tokens: two blocks of 4
    s.add(a)
    mb = s.schedule()
    first = mb.message.segments[0]
    assert (first.table_start, len(first.blocks)) == (0, 2)
    land(s, mb)
    nxt = s.schedule().message.segments[0]  # position 6: still in the second block
    assert (nxt.start, nxt.table_start, nxt.blocks) == (6, 2, ())


@pytest.mark.parametrize("where", ["commit", "catalog"])
def test_a_landing_that_raises_leaves_no_index_reserved(where, monkeypatch):
    """The engine fails that one request (its postprocessing raised); the checkpoint indices its
    segment reserved must be free again, not lost to every later request."""
    s = sched(blocks=32, every=4)
    a = seq(0, list(range(1, 11)))
    s.add(a)
    mb = s.schedule()
    assert s.kv.prefix.num_reserved == 4

    def boom(*args, **kw):
        raise RuntimeError("planted")

    target = (s.kv.blocks, "commit") if where == "commit" else (s.kv.prefix, "add")
    monkeypatch.setattr(*target, boom)
    with pytest.raises(RuntimeError, match="planted"):
        land(s, mb)
    assert s.kv.prefix.num_reserved == 0


def test_a_second_request_with_the_same_prefix_resumes_from_its_checkpoint():
    s = sched(blocks=32, every=4)
    prompt = list(range(1, 11))
    a = seq(0, prompt)
    s.add(a)
    mb = s.schedule()  # one chunk, emitting every 4 tokens, after 9 (all but the last) and 10
    emits = dict(mb.message.segments[0].emits)  # position -> its reserved index
    assert sorted(emits) == [4, 8, 9, 10]
    assert s.kv.prefix.num_checkpoints == 0 and not mb.message.saves  # not before it lands
    land(s, mb)
    assert a.num_computed == 10 and s.kv.prefix.num_checkpoints == 4
    b = seq(1, prompt[:9] + [99, 98])
    s.add(b)
    mb = s.schedule()
    resumed = next(g for g in mb.message.segments if g.seq_id == 1)
    assert (resumed.start, resumed.restore, resumed.table_start) == (9, emits[9], 0)
    shared = tuple(s.kv.table(a.seq_id)[:2])
    assert b.num_cached == 9 and resumed.blocks[:2] == shared  # shared, not copied
    assert (s.kv.table(a.seq_id)[2], resumed.blocks[2]) in mb.message.copies  # the tail: copied
    assert [p for p, _ in resumed.emits] == [10, 11]


def test_when_blocks_run_out_the_youngest_sequence_is_preempted_and_recomputed_later():
    s = sched(blocks=5, checkpoints=0)
    old, young = seq(0, range(1, 8)), seq(1, range(20, 27))  # 7 tokens: 2 blocks each
    s.add(old)
    land(s, s.schedule())
    s.add(young)
    land(s, s.schedule())
    assert s.kv.blocks.num_free == 1
    for _ in range(6):  # decode on: young waits for a block; old takes young's when it needs one
        mb = s.schedule()
        if s.num_preemptions:
            break
        land(s, mb)
    assert s.num_preemptions == 1 and [q.seq_id for q in mb.seqs] == [0]
    assert young in s.waiting and young.num_computed == 0 and young.output_ids == [7, 7]
    assert young.slot is None and not s.kv.table(young.seq_id) and 1 in mb.message.finished
    land(s, mb)
    s.finish(old, "stop")
    back = s.schedule()  # readmitted: prompt and outputs run again, the last one samples
    assert back.seqs == [young] and back.message.segments[0].length == 9
    assert back.message.admitted[0].output_ids == (7, 7)


def snap_sched(blocks=32, checkpoints=8, every=4) -> Scheduler:
    kv = KVCache(blocks, 4, checkpoints, checkpoint_every=every, snapshots=True)
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_batched_tokens=64), 4, kv)


def test_with_snapshots_each_full_block_and_checkpoint_is_exported_as_it_is_made():
    s = snap_sched()
    a = seq(0, range(1, 7))  # 6 tokens: one full block, checkpoints emitted at 4, 5 and 6
    s.add(a)
    land(s, s.schedule())  # block 0 full; the checkpoints at 5 and 6 hold block 1
    mb = s.schedule()  # (the emitted checkpoints are exported by the next message)
    assert mb.message.export_blocks == tuple(s.kv.table(a.seq_id)[:2])
    assert sorted(mb.message.export_ckpts) == sorted(s.kv.prefix.held()[0])
    assert len(mb.message.export_ckpts) == 3 and not mb.message.saves
    land(s, mb)
    exported = [mb.message.export_blocks]
    for _ in range(8):  # decode: each block once as it fills, nothing in between
        mb = s.schedule()
        exported.append(mb.message.export_blocks)
        land(s, mb)
    flat = [b for e in exported for b in e]
    # block 1 first with the checkpoints at 5 and 6, whose tail it holds
    table = s.kv.table(a.seq_id)
    assert flat == [table[0], table[1], *table[1 : a.num_computed // 4]]


def test_a_checkpoint_inside_a_block_exports_that_partial_block_with_it():
    """Resuming copies the checkpoint's tail block: a replacement needs its first positions."""
    s = snap_sched()
    a = seq(0, range(1, 7))  # the prompt ends at 6, inside its second block
    s.add(a)
    land(s, s.schedule())  # emits the end-of-prompt checkpoint
    mb = s.schedule()
    (end,) = [cp.ckpt for cp in s.kv.prefix.checkpoints() if cp.length == 6]
    assert end in mb.message.export_ckpts and s.kv.table(a.seq_id)[1] in mb.message.export_blocks


def test_a_decoding_sequence_keeps_one_snapshot_the_older_goes_once_the_newer_lands():
    s = snap_sched(every=4)
    a = seq(0, range(1, 4))  # 3-token prompt: checkpoints at 2 and 3; decode snapshots at 4, 8
    s.add(a)
    land(s, s.schedule())
    cache = s.kv.prefix
    lengths = []
    for _ in range(7):
        mb = s.schedule()
        land(s, mb)
        s.kv.drop_superseded(mb.ops.superseded)  # (the engine does this when a message lands)
        lengths.append(sorted(cp.length for cp in cache.checkpoints()))
    # the prompt's stay (prefix reuse); of the snapshots only the newest remains
    assert lengths[-1] == [2, 3, 8] and [2, 3, 4] in lengths and [2, 3, 4, 8] in lengths
    assert s.kv.snapshot(a.seq_id).length == 8


def test_what_a_failed_message_exported_is_forgotten_after_a_replacement():
    s = snap_sched(every=4)
    a = seq(0, range(1, 10))  # 9 tokens: checkpoints emitted at 4, 8 and 9
    s.add(a)
    land(s, s.schedule())  # 0..9
    failed = s.schedule()  # exports them and blocks 0, 1 and 2
    assert failed.message.export_ckpts and failed.message.export_blocks
    s.kv.forget_unexported([failed.message])
    assert s.kv.prefix.num_checkpoints == 0 and s.kv.blocks.num_cached == 0
    assert s.kv.blocks.lookup(block_keys(list(range(1, 10)), 4)[0]) is None


def test_rewind_resumes_every_running_sequence_from_its_latest_checkpoint():
    s = snap_sched(every=4)
    a = seq(0, range(1, 4))
    s.add(a)
    land(s, s.schedule())
    for _ in range(6):  # to position 9: the snapshot at 8 (saved, exported) has landed
        mb = s.schedule()
        land(s, mb)
        s.kv.drop_superseded(mb.ops.superseded)
    assert a.num_computed == 9 and s.kv.snapshot(a.seq_id).length == 8
    snapshot = s.kv.snapshot(a.seq_id)
    s.rewind()
    assert a in s.waiting and s.num_preemptions == 0
    back = s.schedule()
    seg = back.message.segments[0]
    assert (seg.start, seg.length, seg.restore) == (8, 2, snapshot.ckpt)  # 8 and 9 run again
    assert seg.samples == (a.seq_id,)


def test_a_sequence_ending_on_a_snapshot_keeps_it_as_its_final_state():
    s = snap_sched(every=4)
    a = seq(0, range(1, 4))
    s.add(a)
    land(s, s.schedule())
    while a.num_computed < 8:  # the snapshot at 8 lands
        mb = s.schedule()
        land(s, mb)
        s.kv.drop_superseded(mb.ops.superseded)
    s.finish(a, "stop")  # its last state is the snapshot at 8: that one stays
    assert [cp.length for cp in s.kv.ops.superseded] == [4]  # (the one 8 replaced, still to go)
    assert sorted(cp.length for cp in s.kv.prefix.checkpoints()) == [2, 3, 4, 8]


def test_a_checkpoint_waiting_to_be_restored_is_not_evicted_for_another():
    alloc, cache = prefix_cache(checkpoints=1)
    a = list(range(10, 15))
    kept = save(cache, a, 5, tail_block=None)
    cache.pin(kept.ckpt)  # a sequence resumed from it; its segment has not gone out yet
    assert save(cache, list(range(20, 25)), 5, tail_block=None) is None  # no index to reuse
    cache.unpin(kept.ckpt)
    assert save(cache, list(range(20, 25)), 5, tail_block=None).ckpt == kept.ckpt
