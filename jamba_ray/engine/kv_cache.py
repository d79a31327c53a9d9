"""The owner of every sequence's paged state (block table, keys, restore pin, snapshot), of the
checkpoint catalog and of the operations a step makes on the stages' state. Pure Python.

Records are keyed by sequence id and change only through this lifecycle: admit (resume) -> grow ->
segment (its emits reserved) -> land (emits catalogued) -> fork -> save -> release / restart, plus
clear and forget after failures. Every block refcount change happens here; state operations go into
one builder, sealed into a message. Making checkpoints is `checkpointing.py`'s part of it.
"""

from __future__ import annotations

from .blocks import BlockAllocator, chain_key, root_key
from .checkpointing import Checkpointing
from .messages import Fork
from .prefix import Checkpoint, PrefixCache
from .seq_state import Resumed, SegmentState, SeqState, tokens_of
from .sequence import Sequence
from .step_ops import SavedCheckpoint, StateOps, StepOpsBuilder


class KVCache(Checkpointing):
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_checkpoints: int,
        checkpoint_every: int,
        snapshots: bool = False,
    ):
        self.blocks = BlockAllocator(num_blocks, block_size)
        self.prefix = PrefixCache(self.blocks, num_checkpoints) if num_checkpoints else None
        self.block_size, self.checkpoint_every = block_size, checkpoint_every
        # Exports (recovery snapshots; a prefix tier, `tier_link.py`): every checkpoint and full
        # block as made; snapshots also checkpoint decoding sequences every `checkpoint_every`.
        self.snapshots = snapshots and self.prefix is not None
        self.ops = StepOpsBuilder(exports_ckpts=self.snapshots)
        self.records: dict[int, SeqState] = {}
        # seq id -> its latest decode snapshot (kept across preemptions, until it ends)
        self.snapshots_of: dict[int, Checkpoint] = {}
        self.tier = None  # a prefix tier's link (`tier_link.TierLink`): imports at admission
        # restores in the message being built: pinned until it is sealed (no emit of the same
        # message may take their index)
        self._sent_restores: list[int] = []

    def table(self, seq_id: int) -> list[int]:
        return list(self.records[seq_id].blocks) if seq_id in self.records else []

    def snapshot(self, seq_id: int) -> Checkpoint | None:
        return self.snapshots_of.get(seq_id)

    def stats(self) -> dict:
        blocks, prefix = self.blocks, self.prefix
        tails = prefix.held()[1] if prefix else set()
        return {
            "kv_blocks_in_use": blocks.num_used,
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_cached": blocks.num_cached,
            "block_size": blocks.block_size,
            "prefix_checkpoints": prefix.num_checkpoints if prefix else 0,
            "prefix_checkpoints_reserved": prefix.num_reserved if prefix else 0,
            "kv_blocks_held_by_checkpoints": len(tails),
            "prefix_cache_queries": prefix.queries if prefix else 0,
            "prefix_cache_hits": prefix.hits if prefix else 0,
            **(self.tier.stats() if self.tier is not None else {}),
        }

    def seal(self) -> StateOps:
        for ckpt in self._sent_restores if self.prefix is not None else ():
            self.prefix.unpin(ckpt)
        self._sent_restores = []
        return self.ops.seal()

    # ---- admission ---------------------------------------------------------------------------
    def available(self) -> int:
        """Blocks that can be had now: free or cached ones, and the tail blocks that only
        unpinned checkpoints hold (they are evicted for them under pressure)."""
        spare = self.prefix.spare_tails() if self.prefix is not None else 0
        return self.blocks.num_free + spare

    def _make_room(self, n: int) -> bool:
        """At least `n` blocks allocatable: checkpoints are evicted for their tail blocks."""
        while self.blocks.num_free < n and self.prefix is not None:
            cp = self.prefix.evict_for_block()
            if cp is None:
                break
            self._forget_snapshot(cp)
            self._release_checkpoint(cp)
        return self.blocks.num_free >= n

    def _allocate(self, n: int) -> list[int]:
        if not self._make_room(n):
            raise RuntimeError(f"asked for {n} KV blocks, {self.blocks.num_free} free")
        return self.blocks.allocate(n)

    def can_admit(self, seq: Sequence, forks: int, reserve: int) -> bool:
        """Room for the whole known sequence plus one block per fork, beyond `reserve`."""
        need = self.blocks.blocks_for(seq.length) + forks
        return need + reserve <= self.available()

    def admit(self, seq: Sequence, forks: list[Sequence], logprobs_k=None) -> Resumed | None:
        """Records for `seq` and its forks (each holds one block for its copied last block), and
        `seq` resumed from its longest cached prefix, if any: shared full blocks, a copy of the
        checkpoint's tail block, and the checkpoint restored into its slot by the stages. Where
        the cached full blocks reach further, its prefill emits a checkpoint there. A prefix
        tier first imports what it holds beyond the local cache."""
        if self.tier is not None:
            self.tier.import_prefix(seq)
        root = root_key(getattr(seq.params, "cache_salt", None))
        rec = self.records[seq.seq_id] = SeqState(root)
        for f in forks:
            self.records[f.seq_id] = SeqState(root, self._allocate(1))
        if self.prefix is None:
            return None
        found = self.prefix.lookup(seq.prompt_ids + seq.output_ids, root, logprobs_k)
        match, rec.junction = found.match, found.reach
        if match is None:
            return None
        cp = match.checkpoint
        for b in match.blocks:
            self.blocks.share(b)
        rec.blocks, rec.keys = list(match.blocks), list(match.keys)
        if cp.tail_block is not None:  # private: this sequence writes past the checkpoint
            (own,) = self._allocate(1)
            self.ops.copies.append((cp.tail_block, own))
            rec.blocks.append(own)
        rec.restore = cp.ckpt
        self.prefix.pin(cp.ckpt)
        logprobs = list(self.prefix.logprobs[cp.ckpt][1]) if logprobs_k is not None else None
        return Resumed(cp.length, logprobs)

    # ---- growth ------------------------------------------------------------------------------
    def needed(self, seq: Sequence, end: int) -> int:
        return max(0, self.blocks.blocks_for(end) - len(self.records[seq.seq_id].blocks))

    def grow(self, seq: Sequence, end: int) -> bool:
        """Blocks for positions [0, end); False (and nothing taken) when too few are free."""
        need = self.needed(seq, end)
        if not self._make_room(need):
            return False
        self.records[seq.seq_id].blocks += self.blocks.allocate(need)
        return True

    def segment(self, seq: Sequence, end: int) -> SegmentState:
        """The table entries and restore the stages lack, now marked sent (a restore in a sealed
        message no longer pins its checkpoint), and the checkpoints the segment up to `end`
        emits."""
        rec = self.records[seq.seq_id]
        emits = self.plan_emits(seq, end)
        state = SegmentState(tuple(rec.blocks[rec.sent :]), rec.sent, rec.restore, emits)
        if rec.restore is not None:
            self._sent_restores.append(rec.restore)
        rec.restore, rec.sent = None, len(rec.blocks)
        return state

    def _unpin(self, rec: SeqState) -> None:
        if rec.restore is not None and self.prefix is not None:
            self.prefix.unpin(rec.restore)
        rec.restore = None

    # ---- forks -------------------------------------------------------------------------------
    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """After `parent`'s prefill: each child shares its full blocks; its partial last block is
        copied into the block the child holds since admission; the Mamba state is forked."""
        if not children:
            return
        prec, full = self.records[parent.seq_id], parent.num_computed // self.block_size
        for child in children:
            rec = self.records[child.seq_id]
            reserved = rec.blocks
            for b in prec.blocks[:full]:
                self.blocks.share(b)
            rec.blocks = prec.blocks[:full]
            if parent.num_computed % self.block_size:
                self.ops.copies.append((prec.blocks[full], reserved[0]))
                rec.blocks.append(reserved[0])
            else:
                self.blocks.free(reserved)
            rec.keys, rec.sent = list(prec.keys), 0
        self.ops.forks.append(Fork(parent.slot, tuple(c.slot for c in children)))

    # ---- after a segment ran -----------------------------------------------------------------
    def land(self, seq: Sequence, end: int, emits=()) -> list[SavedCheckpoint]:
        """Full blocks become shareable; the checkpoints the segment emitted enter the catalog
        (returned); with snapshots, a decoding sequence is checkpointed every `checkpoint_every`
        tokens (by the next message)."""
        rec, bs = self.records.get(seq.seq_id), self.block_size
        if rec is None:
            self.release_emits(emits)
            return []
        try:
            while (len(rec.keys) + 1) * bs <= end:
                i = len(rec.keys)
                key = chain_key(rec.keys[-1] if rec.keys else rec.root, tokens_of(seq, i * bs, bs))
                if self.blocks.commit(rec.blocks[i], key) and self.ops.exports_ckpts:
                    self.ops.export_blocks.append(rec.blocks[i])
                rec.keys.append(key)
        except BaseException:  # (the request fails; its reserved indices must not be lost)
            self.release_emits(emits)
            raise
        landed = self.land_emits(seq, emits)
        if self.snapshots and end > len(seq.prompt_ids) and end % self.checkpoint_every == 0:
            self.save(seq, end, snapshot=True)
        return landed

    # ---- the end of a sequence's state ------------------------------------------------------
    def release(self, seq: Sequence, forget: bool, ended: bool = False) -> None:
        """Its blocks go back (to the cache where committed); a restore it had not sent is off;
        pending operations into its blocks or slot are dropped. With `forget` (or when the
        stages hold its table) they drop it with the next message. Once `ended`, its snapshot
        is an ordinary checkpoint."""
        if ended:
            self.snapshots_of.pop(seq.seq_id, None)
        rec = self.records.pop(seq.seq_id, None)
        if rec is None:
            return
        self._unpin(rec)
        self.blocks.free(rec.blocks)
        gone = {b for b in rec.blocks if self.blocks.refs(b) == 0}
        self.ops.copies = [(s, d) for s, d in self.ops.copies if d not in gone]
        saving = {slot for slot, _ in self.ops.saves}
        if seq.slot is not None and seq.slot not in saving:  # a fork into its slot is moot
            # (unless its last state is saved from there: a fork applies before the saves)
            forks = [Fork(f.src, tuple(d for d in f.dsts if d != seq.slot)) for f in self.ops.forks]
            self.ops.forks = [f for f in forks if f.dsts]
        if forget or rec.sent:
            self.ops.forgotten.append(seq.seq_id)

    def restart(self, seq: Sequence) -> None:
        """`seq` re-runs every token from a fresh state into fresh blocks (a replay); its next
        segment sends the whole table, replacing the stages' copy."""
        rec = self.records[seq.seq_id]
        rec.sent = 0  # (not forgotten: the whole table goes out again)
        self.release(seq, forget=False)
        self.records[seq.seq_id] = SeqState(rec.root)

    def forget_again(self, seq_ids: tuple[int, ...]) -> None:
        """A failed message carried these: the stages may still hold them."""
        self.ops.forgotten += list(seq_ids)

    # ---- failures ----------------------------------------------------------------------------
    def clear(self) -> None:
        """A stage lost (or may have half-applied) state: no cached prefix is trusted any more.
        Pending saves and exports go; copies and forks for live sequences stay."""
        if self.prefix is not None:
            for cp in self.prefix.clear():
                self._release_checkpoint(cp)
            self.snapshots_of.clear()
        self.blocks.drop_cache()
        self.ops.drop_checkpoints()

    def unexported(self, failed: list) -> tuple[set[int], set[int]]:
        """Checkpoints and blocks whose exports never landed: those the `failed` messages
        carried, and those still waiting for the next message."""
        ckpts = {c for m in failed for c in m.export_ckpts} | self.ops.pending_ckpts()
        blocks = {b for m in failed for b in m.export_blocks} | set(self.ops.export_blocks)
        return ckpts, blocks

    def reexport(self, blocks: list[int]) -> None:
        """Export these again with the next message (a failed one carried them): those that are
        still committed, hence unchanged."""
        self.ops.export_blocks += [b for b in blocks if self.blocks.committed(b)]

    def forget_unexported(self, failed: list) -> None:
        """A stage was replaced from the snapshots: what did not reach it (`unexported`) is not
        cached any more."""
        ckpts, blocks = self.unexported(failed)
        if self.prefix is not None:
            for cp in self.prefix.discard(ckpts):
                self._release_checkpoint(cp)
        for b in blocks:
            self.blocks.uncommit(b)
        self.ops.drop_checkpoints()
