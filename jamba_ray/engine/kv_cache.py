"""Each sequence's KV block table and its Mamba checkpoints: growth, sharing, commits, resumes.

Pure Python bookkeeping over `BlockAllocator` and `PrefixCache`; the state operations it decides
(block copies, checkpoint saves) ride in the next step message, before any segment runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import BlockAllocator, chain_hash
from .prefix import Checkpoint, PrefixCache
from .sequence import Sequence


@dataclass(frozen=True, slots=True)
class StateOps:
    """What the next message does to the stages' state before its segments run."""

    copies: tuple[tuple[int, int], ...] = ()  # (src block, dst block)
    saves: tuple[tuple[int, int], ...] = ()  # (slot, checkpoint)
    export_ckpts: tuple[int, ...] = ()
    export_blocks: tuple[int, ...] = ()
    superseded: tuple[Checkpoint, ...] = ()  # snapshots dropped once this message lands


class KVCache:
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
        # Recovery snapshots: every checkpoint and full block is exported as it is made, and
        # decoding sequences are checkpointed every `checkpoint_every` tokens too.
        self.snapshots = snapshots and self.prefix is not None
        self.copies: list[tuple[int, int]] = []  # (src block, dst block), for the next message
        self.saves: list[tuple[int, int]] = []  # (slot, checkpoint)
        self.exports: list[int] = []  # full blocks to export with the next message
        self.superseded: list[Checkpoint] = []  # snapshots the next message's saves replace
        self.saved: list[tuple[Sequence, int, int]] = []  # (seq, checkpoint, length): the engine
        # keeps prompt logprobs beside them

    def take_ops(self) -> StateOps:
        copies, saves, exports, superseded = self.copies, self.saves, self.exports, self.superseded
        self.copies, self.saves, self.exports, self.superseded = [], [], [], []
        ckpts = tuple(c for _, c in saves) if self.snapshots else ()
        return StateOps(tuple(copies), tuple(saves), ckpts, tuple(exports), tuple(superseded))

    def drop_superseded(self, superseded: tuple[Checkpoint, ...]) -> None:
        """The message that saved their successors landed: older snapshots go (those still
        there: one evicted meanwhile, its index maybe reused, is left alone)."""
        for cp in superseded:
            self.prefix.supersede(cp)

    # ---- growth ------------------------------------------------------------------------------
    def needed(self, seq: Sequence, end: int) -> int:
        return max(0, self.blocks.blocks_for(end) - len(seq.blocks))

    def grow(self, seq: Sequence, end: int) -> bool:
        """Blocks for positions [0, end); False (and nothing taken) when too few are free."""
        need = self.needed(seq, end)
        if need > self.blocks.num_free:
            return False
        seq.blocks += self.blocks.allocate(need)
        return True

    def release(self, seq: Sequence) -> None:
        """Its blocks go back (to the cache where committed); a restore it had not sent yet is
        off, and so is the pin on that checkpoint."""
        self.blocks.free(seq.blocks)
        seq.blocks, seq.hashes, seq.blocks_sent = [], [], 0
        self.restore_sent(seq)
        seq.restore = None

    def restore_sent(self, seq: Sequence) -> None:
        """Its pending restore is in a message now (or off): its checkpoint may be reused."""
        if seq.restore is not None and self.prefix is not None:
            self.prefix.unpin(seq.restore)

    # ---- prefix reuse ------------------------------------------------------------------------
    def resume(self, seq: Sequence, logprobs_k: int | None = None) -> None:
        """Start `seq` from its longest cached prefix, if any: shared full blocks, a copy of the
        checkpoint's tail block, and the checkpoint restored into its slot by the stages. A
        sequence that wants prompt logprobs (`logprobs_k`) takes the covered ones from it too."""
        if self.prefix is None:
            return
        match = self.prefix.match(seq.prompt_ids + seq.output_ids, logprobs_k)
        if match is None:
            return
        cp = match.checkpoint
        for b in match.blocks:
            self.blocks.share(b)
        seq.blocks = list(match.blocks)
        if cp.tail_block is not None:
            (own,) = self.blocks.allocate(1)
            self.copies.append((cp.tail_block, own))
            seq.blocks.append(own)
        seq.hashes = list(match.hashes)
        seq.num_computed = seq.num_cached = cp.length
        seq.restore = cp.ckpt
        self.prefix.pin(cp.ckpt)
        if logprobs_k is not None:
            seq.cached_logprobs = list(self.prefix.logprobs[cp.ckpt][1])

    def can_resume_all(self, seq: Sequence, reserve: int) -> bool:
        """Room for the whole known sequence plus one block per fork, beyond `reserve`."""
        need = self.blocks.blocks_for(seq.length) + len(seq.forks)
        return need + reserve <= self.blocks.num_free

    # ---- forks -------------------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares the parent's full blocks; its partial last block is a copy (written by
        both from here on). `child.blocks` holds the one block reserved for it at admission."""
        reserved = child.blocks
        full = parent.num_computed // self.block_size
        for b in parent.blocks[:full]:
            self.blocks.share(b)
        child.blocks = parent.blocks[:full]
        if parent.num_computed % self.block_size:
            self.copies.append((parent.blocks[full], reserved[0]))
            child.blocks.append(reserved[0])
        else:
            self.blocks.free(reserved)
        child.hashes, child.blocks_sent = list(parent.hashes), 0

    # ---- after a segment ran -----------------------------------------------------------------
    def landed(self, seq: Sequence, end: int) -> None:
        """Full blocks become shareable; a checkpoint at the end of a prompt and every
        `checkpoint_every` tokens inside it."""
        tokens = None
        while (len(seq.hashes) + 1) * self.block_size <= end:
            tokens = tokens or seq.prompt_ids + seq.output_ids
            i, bs = len(seq.hashes), self.block_size
            h = chain_hash(
                seq.hashes[-1] if seq.hashes else None, tuple(tokens[i * bs : (i + 1) * bs])
            )
            if self.blocks.commit(seq.blocks[i], h) and self.snapshots:
                self.exports.append(seq.blocks[i])
            seq.hashes.append(h)
        periodic = end % self.checkpoint_every == 0
        if end == len(seq.prompt_ids) or (seq.in_prefill and periodic):
            self.save(seq, end)
        elif self.snapshots and periodic:
            self.save(seq, end, snapshot=True)

    def save(self, seq: Sequence, length: int, snapshot: bool = False) -> None:
        """A checkpoint of `seq` after `length` tokens. A `snapshot` (a decoding sequence's,
        kept for recovery) supersedes its previous one once the message saving it lands; so does
        its last state when it ends (unless that is the snapshot itself)."""
        if self.prefix is None or seq.slot is None or length < 1:
            return
        full = length // self.block_size
        tail = seq.blocks[full] if length % self.block_size else None
        # the chain hash of its full blocks, already committed (else the cache computes it)
        chain = seq.hashes[full - 1] if 0 < full <= len(seq.hashes) else None
        cp = self.prefix.save(seq.prompt_ids + seq.output_ids, length, tail, chain)
        if cp is None:
            return
        self.saves.append((seq.slot, cp.ckpt))
        self.saved.append((seq, cp.ckpt, length))
        if seq.snapshot is not None:
            self.superseded.append(seq.snapshot)
        seq.snapshot = cp if snapshot else None
        if self.snapshots and tail is not None:  # its positions < length are final now
            self.exports.append(tail)

    def next_stop(self, seq: Sequence, end: int) -> int:
        """Where a prefill chunk ending at `end` should stop: at the next checkpoint inside it."""
        if self.prefix is None or not seq.in_prefill:
            return end
        step = self.checkpoint_every
        nxt = (seq.num_computed // step + 1) * step
        return min(end, nxt) if nxt < len(seq.prompt_ids) else end

    def clear(self) -> None:
        """A stage lost its state: no cached prefix can be trusted any more."""
        if self.prefix is not None:
            self.prefix.clear()
        else:
            self.blocks.drop_cache()
        self.copies, self.saves, self.exports, self.saved = [], [], [], []
        self.superseded = []

    def unexported(self, failed: list) -> tuple[set[int], set[int]]:
        """Checkpoints and blocks whose exports never landed: those the `failed` messages
        carried, and those still waiting for the next message."""
        ckpts = {c for m in failed for c in m.export_ckpts} | {c for _, c in self.saves}
        blocks = {b for m in failed for b in m.export_blocks} | set(self.exports)
        return ckpts, blocks

    def trusted(self, failed: list) -> tuple[set[int], set[int]]:
        """What a replacement must import: the checkpoints and KV blocks the engine may still
        read from (committed blocks, and the tail blocks checkpoints hold), less `unexported`."""
        if self.prefix is None:
            return set(), set()
        ckpts, tails = self.prefix.held()
        lost_ckpts, lost_blocks = self.unexported(failed)
        return ckpts - lost_ckpts, (tails | self.blocks.committed_blocks()) - lost_blocks

    def reexport(self, blocks: list[int]) -> None:
        """Export these again with the next message (a failed one carried them): those that are
        still committed, hence unchanged."""
        self.exports += [b for b in blocks if self.blocks.committed(b)]

    def forget_unexported(self, failed: list) -> None:
        """A stage was replaced from the snapshots: what did not reach it (`unexported`) is not
        cached any more."""
        ckpts, blocks = self.unexported(failed)
        if self.prefix is not None:
            self.prefix.discard(ckpts)
        for b in blocks:
            self.blocks.uncommit(b)
        self.copies, self.saves, self.exports, self.saved = [], [], [], []
        self.superseded = []
