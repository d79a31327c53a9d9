"""A model of per-sequence state, driven at random: the real Scheduler, KVCache and Recovery
against a simulated stage that applies every StepMessage as the stages do.

The simulated stage keeps, per KV block, which token each position holds, per slot and per
checkpoint which token prefix its Mamba state has seen (a segment's emits write the prefix up to
their position as it runs), and what the driver holds as exported snapshots. Every segment it
applies is checked the way a real stage would get it wrong: the slot's state must be the
sequence's tokens before `start`, every KV position before `start` must hold the sequence's token,
no block it writes may be in another live sequence's table, and no checkpoint it emits into may be
in the catalog or restored by the same message. After every rule the bookkeeping is checked:
refcounts equal holders, every block is free, cached or held, slots and records belong to live
sequences only, pending copies target private blocks, every catalogued checkpoint holds exactly the
tokens its key names; once every request has ended, the blocks in use are exactly those
checkpoints hold.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jamba_ray.config.engine_config import SchedulerConfig
from jamba_ray.engine.blocks import UNSALTED, block_keys, root_key
from jamba_ray.engine.kv_cache import KVCache
from jamba_ray.engine.messages import StepFailure
from jamba_ray.engine.recovery import Recovery, Replaced
from jamba_ray.engine.recovery import trusted as recovery_trusted
from jamba_ray.engine.scheduler import Scheduler
from jamba_ray.engine.sequence import Sequence

BS = 4  # tokens per KV block
GARBAGE = -1  # what a failed computation leaves in KV and Mamba state
PREFIXES = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 9], [8, 7, 6, 5, 4, 3, 2, 1, 8]]


@dataclass(frozen=True)
class Params:
    max_tokens: int
    priority: int = 0
    cache_salt: str | None = None
    prompt_logprobs: None = None


class Stage:
    """What one stage's state pool holds, token by token."""

    def __init__(self):
        self.blocks: dict[int, list[int | None]] = {}
        self.slots: dict[int, tuple | None] = {}
        self.ckpts: dict[int, tuple | None] = {}
        self.tables: dict[int, list[int]] = {}
        self.exported: tuple[dict, dict] = ({}, {})  # (ckpts, blocks) the driver holds

    def block(self, b: int) -> list:
        return self.blocks.setdefault(b, [None] * BS)

    def apply(self, msg, seqs, kv: KVCache, failed: bool) -> tuple[dict, dict]:
        """The message's state operations, then its segments (checked); returns its exports."""
        for sid in msg.finished:
            self.tables.pop(sid, None)
        for src, dst in msg.copies:
            self.blocks[dst] = list(self.block(src))
        for f in msg.forks:
            for d in f.dsts:
                self.slots[d] = self.slots.get(f.src)
        for slot, c in msg.saves:
            self.ckpts[c] = self.slots.get(slot)
        exports = (
            {c: self.ckpts.get(c) for c in msg.export_ckpts},
            {b: list(self.block(b)) for b in msg.export_blocks},
        )
        emitted = [c for seg in msg.segments for _, c in seg.emits]
        assert len(set(emitted)) == len(emitted), "two emits into one checkpoint"
        catalog = kv.prefix.held()[0] if kv.prefix is not None else set()
        assert not set(emitted) & catalog, "an emit into a checkpoint others may restore"
        assert not {s.restore for s in msg.segments} & set(emitted), "restore of an emit"
        for seg, seq in zip(msg.segments, seqs):
            table = self.tables.get(seg.seq_id, [])[: seg.table_start] + list(seg.blocks)
            self.tables[seg.seq_id] = table
            if seg.restore is not None:
                self.slots[seg.slot] = self.ckpts.get(seg.restore)
            elif seg.start == 0:
                self.slots[seg.slot] = ()
            self._run(seg, seq, table, kv, failed)
        return exports

    def _run(self, seg, seq: Sequence, table: list[int], kv: KVCache, failed: bool) -> None:
        tokens = seq.prompt_ids + seq.output_ids
        assert self.slots.get(seg.slot) == tuple(tokens[: seg.start]), "wrong Mamba state"
        for p in range(seg.start):
            assert self.block(table[p // BS])[p % BS] == tokens[p], f"wrong KV at {p}"
        others = {b for sid, r in kv.records.items() if sid != seq.seq_id for b in r.blocks}
        for p in range(seg.start, seg.end):
            b = table[p // BS]
            assert b not in others, f"block {b} is written by two live sequences"
            assert not kv.blocks.committed(b), f"committed block {b} written"
            self.block(b)[p % BS] = GARBAGE if failed else tokens[p]
        for p, c in seg.emits:  # the state after p tokens, written while the segment runs
            assert seg.start < p <= seg.end, f"emit at {p} outside ({seg.start}, {seg.end}]"
            self.ckpts[c] = (GARBAGE,) if failed else tuple(tokens[:p])
        self.slots[seg.slot] = (GARBAGE,) if failed else tuple(tokens[: seg.end])

    def replace(self, trusted) -> bool:
        """A replacement: it imports the trusted snapshots (all of them, or it starts empty)."""
        ckpts, blocks = trusted
        have_c, have_b = self.exported
        ok = ckpts <= have_c.keys() and blocks <= have_b.keys()
        self.blocks = {b: list(have_b[b]) for b in blocks} if ok else {}
        self.ckpts = {c: have_c[c] for c in ckpts} if ok else {}
        self.slots, self.tables = {}, {}
        return ok


class StateModel(RuleBasedStateMachine):
    @initialize(
        blocks=st.integers(6, 14),
        checkpoints=st.integers(0, 4),
        every=st.sampled_from([4, 8]),
        snapshots=st.booleans(),
        micro_batches=st.integers(1, 2),
        seed=st.integers(0, 2**16),
    )
    def setup(self, blocks, checkpoints, every, snapshots, micro_batches, seed):
        self.kv = KVCache(blocks, BS, checkpoints, every, snapshots=snapshots)
        config = SchedulerConfig(max_num_seqs=4, max_batched_tokens=6)
        self.sched = Scheduler(config, 4, self.kv, micro_batches)
        self.recovery = Recovery(max_restarts=1)
        self.stage, self.rng = Stage(), random.Random(seed)
        self.in_flight: deque = deque()
        self.seqs: list[Sequence] = []
        self.requests = 0
        self.max_in_flight = micro_batches

    # ---- requests ----------------------------------------------------------------------------
    @rule(
        prefix=st.sampled_from(range(len(PREFIXES))),
        cut=st.integers(1, 9),
        suffix=st.lists(st.integers(1, 9), max_size=6),
        n=st.integers(1, 3),
        max_tokens=st.integers(1, 6),
        priority=st.integers(0, 1),
        salt=st.sampled_from([None, None, "tenant"]),
    )
    def add(self, prefix, cut, suffix, n, max_tokens, priority, salt):
        prompt = PREFIXES[prefix][:cut] + suffix
        params, rid = Params(max_tokens, priority, salt), f"r{self.requests}"
        self.requests += 1
        first, *forks = [
            Sequence(len(self.seqs) + i + 1, rid, i, list(prompt), params, 0) for i in range(n)
        ]
        first.forks = forks
        self.seqs += [first, *forks]
        self.sched.add(first)

    @precondition(lambda self: self.sched.running or self.sched.waiting)
    @rule(data=st.data())
    def abort(self, data):
        live = sorted({s.request_id for s in (*self.sched.running, *self.sched.waiting)})
        self.sched.abort(data.draw(st.sampled_from(live)))

    # ---- the step ----------------------------------------------------------------------------
    @precondition(lambda self: not self.recovery.pending)
    @rule()
    def submit(self):
        if len(self.in_flight) >= self.max_in_flight:
            return
        mb = self.sched.schedule(in_flight=len(self.in_flight) + 1)
        self.sched.preempted = []
        if mb is not None:
            mb.handle = self.stage.apply(mb.message, mb.seqs, self.kv, failed=False)
            self.in_flight.append(mb)

    @precondition(lambda self: self.in_flight)
    @rule()
    def land(self):
        mb = self.in_flight.popleft()
        ckpts, blocks = self.stage.exported
        ckpts.update(mb.handle[0])
        blocks.update(mb.handle[1])
        self.kv.drop_superseded(mb.ops.superseded)
        for seg, seq in zip(mb.message.segments, mb.seqs):
            self.sched.landed(seq, seg)
            if seq.aborted:
                if seq.slot is not None:
                    self.sched.finish(seq, "abort")
                continue
            if not seg.samples:
                continue
            for s in (*self.sched.start_forks(seq), seq):
                self.sched.append(s, self.rng.randint(1, 9))
                if len(s.output_ids) >= s.params.max_tokens:
                    self.sched.finish(s, "length")

    @precondition(lambda self: self.in_flight)
    @rule()
    def fail(self):
        """The oldest micro-batch fails: its segments compute garbage; what it exported is lost."""
        mb = self.in_flight.popleft()
        for seg, seq in zip(mb.message.segments, mb.seqs):  # garbage where it wrote
            table = self.stage.tables.get(seg.seq_id, [])
            for p in range(seg.start, seg.end):
                if p // BS < len(table):
                    self.stage.block(table[p // BS])[p % BS] = GARBAGE
            self.stage.slots[seg.slot] = (GARBAGE,)
            for _, c in seg.emits:  # (a stage may have written some of them)
                self.stage.ckpts[c] = (GARBAGE,)
            seq.in_flight = False
        self.sched.requeue(mb)
        self.recovery.failed(mb, StepFailure("planted"))

    @precondition(lambda self: self.recovery.pending and not self.in_flight)
    @rule(how=st.sampled_from(["compute error", "stage died"]))
    def recover(self, how):
        if how == "stage died":
            trusted = recovery_trusted(self.kv, self.recovery.messages())
            restored = self.kv.snapshots and self.stage.replace(trusted)
            if not restored:
                self.stage.replace((set(), set()))
            outcome = Replaced([0], restored)
        else:
            outcome = Replaced([], False)
        plan = self.recovery.plan(outcome, list(self.sched.running))
        for rid, _ in plan.fail:
            self.sched.abort(rid)
        self.sched.recover(plan)
        for seq in [s for s in self.sched.running if s.aborted]:
            self.sched.finish(seq, "abort")

    @rule()
    def drain(self):
        """Run to the end: every request must finish (no hang, no stuck sequence)."""
        for _ in range(5000):  # (a bound: 40 requests of up to 3 samples need ~1000 steps)
            if self.recovery.pending and not self.in_flight:
                self.recover("compute error")
                continue
            if self._work() and not self.recovery.pending and not self._full():
                before = len(self.in_flight)
                self.submit()
                if len(self.in_flight) > before:
                    continue
            if self.in_flight:
                self.land()
            elif self._work():
                raise AssertionError(f"work left, but nothing can be scheduled: {self._why()}")
            else:
                break
        assert not self._work() and not self.in_flight, "requests did not finish"
        self.idle_baseline()

    def _why(self) -> str:
        seqs = [
            (s.seq_id, s.num_computed, s.length, len(s.forks), s.slot, s.in_flight, s.aborted)
            for s in (*self.sched.running, *self.sched.waiting)
        ]
        return f"seqs {seqs}, free {self.kv.blocks.num_free}, available {self.kv.available()}"

    def _full(self) -> bool:
        return len(self.in_flight) >= self.max_in_flight

    def _work(self) -> bool:
        return bool(self.sched.running or self.sched.waiting)

    # ---- what must always hold ---------------------------------------------------------------
    @invariant()
    def refcounts_equal_holders(self):
        if not hasattr(self, "kv"):
            return
        holders = Counter(b for r in self.kv.records.values() for b in r.blocks)
        if self.kv.prefix is not None:
            holders.update(
                cp.tail_block for cp in self.kv.prefix.checkpoints() if cp.tail_block is not None
            )
        alloc = self.kv.blocks
        for b in range(alloc.num_blocks):
            assert alloc.refs(b) == holders[b], f"block {b}: {alloc.refs(b)} refs, {holders[b]}"
            unheld = (b in alloc._free) + (b in alloc._cached)
            assert unheld == (holders[b] == 0), f"block {b} is lost or double-listed"

    @invariant()
    def records_and_slots_belong_to_live_sequences(self):
        if not hasattr(self, "kv"):
            return
        live = [q for s in self.sched.running for q in (s, *s.forks)]
        assert set(self.kv.records) == {q.seq_id for q in live}
        slots = [q.slot for q in live]
        assert None not in slots and len(set(slots)) == len(slots)
        assert set(slots) == self.sched.slots.allocated()
        assert all(q.slot is None for s in self.sched.waiting for q in (s, *s.forks))

    @invariant()
    def written_blocks_are_private(self):
        if not hasattr(self, "kv"):
            return
        owners = Counter(b for r in self.kv.records.values() for b in r.blocks)
        for s in self.sched.running:
            table = self.kv.records[s.seq_id].blocks
            for b in table[s.num_computed // BS :]:  # where it writes next
                assert owners[b] == 1 and not self.kv.blocks.committed(b)
        # a pending copy's target: one sequence's, or (once that one ended) only held by the
        # checkpoints of its last state, whose tokens this copy brings
        prefix = self.kv.prefix
        tails = Counter(cp.tail_block for cp in prefix.checkpoints()) if prefix else Counter()
        for _, dst in self.kv.ops.copies:
            refs = self.kv.blocks.refs(dst)
            assert owners[dst] <= 1 and 0 < refs == owners[dst] + tails[dst]

    @invariant()
    def catalogued_checkpoints_hold_the_state_after_their_tokens(self):
        """Every checkpoint a sequence may resume from holds the prefix its key names (those
        whose save has not gone out yet excepted)."""
        if not hasattr(self, "kv") or self.kv.prefix is None:
            return
        pending = {c for _, c in self.kv.ops.saves}
        roots = (UNSALTED, root_key("tenant"))
        for cp in self.kv.prefix.checkpoints():
            if cp.ckpt in pending:
                continue
            state = self.stage.ckpts.get(cp.ckpt)
            assert state is not None and GARBAGE not in state, f"checkpoint {cp} holds {state}"
            full = cp.length // BS * BS
            assert len(state) == cp.length and state[full:] == cp.tail, f"{cp}: {state}"
            chains = [(block_keys(list(state[:full]), BS, root=r) or [r])[-1] for r in roots]
            assert cp.chain in chains, f"checkpoint {cp.ckpt} holds other tokens: {state}"

    def idle_baseline(self):
        prefix = self.kv.prefix
        tails = prefix.held()[1] if prefix else set()
        assert not self.kv.records and self.sched.slots.num_used == 0
        assert self.kv.blocks.num_used == len(tails), "blocks in use beyond checkpoint tails"
        assert prefix is None or not prefix._pins and not prefix.num_reserved
        assert not self.kv.snapshots_of or all(s.finished for s in self.seqs)

    def teardown(self):
        if hasattr(self, "kv"):
            self.drain()


TestStateModel = StateModel.TestCase
# Derandomized: the same 1000 runs on every machine (a red CI is a real bug, reproducible); raise
# max_examples locally to search further (2000 found the scheduler bugs of cdda7ab; the suite's
# 12-minute budget keeps 1000 here).
TestStateModel.settings = settings(
    max_examples=1000,
    stateful_step_count=50,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_a_stage_replaced_without_snapshots_leaves_no_cached_prefix_even_with_nothing_to_replay():
    """Its replacement holds no checkpoint: trusting the cache would restore garbage. (Found by
    the model above; a plan that only replays the running sequences kept the cache when none
    was running.)"""
    plan = Recovery(max_restarts=1).plan(Replaced([0], restored=False), running=[])
    assert plan.clear_cache and not plan.replay and plan.stage_restarts == 1
