"""Where Mamba checkpoints are made, and their way into the catalog. Pure Python.

A prefill chunk runs at full size and emits checkpoints inside it (`Segment.emits`): every
`checkpoint_every` tokens of the prompt, after all but its last token (an exact repeat resumes
there and runs one token for its logits), at its end (a continuation resumes there), and at the
junction: how far the cached full blocks of its prompt reach past the checkpoint it resumed from,
so that later requests sharing that prefix resume at the last shared full block. Their indices are
reserved when the segment is built (neither matchable nor evictable) and enter the catalog only
when its message lands; a failed message frees them. A finished sequence's last state and a
decoding sequence's snapshots are saved by the next message instead (`StepMessage.saves`).
"""

from __future__ import annotations

from .blocks import chain_key
from .micro_batch import wants_prompt_logprobs
from .prefix import Checkpoint
from .seq_state import tokens_of
from .sequence import Sequence
from .step_ops import SavedCheckpoint


def emit_positions(start: int, end: int, prompt_len: int, every: int, junction: int) -> list[int]:
    """Checkpoint positions p with start < p <= end, most valuable first: the prompt's end, all
    but its last token, the junction, then every `every` tokens of the prompt from the latest."""
    periodic = range(min(end, prompt_len) // every * every, start, -every)
    wanted = [prompt_len, prompt_len - 1, junction, *periodic]
    return [p for p in dict.fromkeys(wanted) if start < p <= end and 0 < p <= prompt_len]


class Checkpointing:
    """The checkpoint-making part of `KVCache` (mixed into it): the attributes it uses are the
    KV cache's (blocks, prefix, records, ops, snapshots, snapshots_of, checkpoint_every)."""

    # ---- emitted inside a segment --------------------------------------------------------------
    def plan_emits(self, seq: Sequence, end: int) -> tuple[tuple[int, int], ...]:
        """(p, reserved checkpoint) for the segment of `seq` ending at `end`, in position order;
        as many as there are indices to reserve (the most valuable positions first)."""
        rec = self.records[seq.seq_id]
        if self.prefix is None or seq.slot is None:
            return ()
        at = emit_positions(
            seq.num_computed, end, len(seq.prompt_ids), self.checkpoint_every, rec.junction
        )
        emits, logprobs = [], wants_prompt_logprobs(seq)
        for p in at:
            if not logprobs and self._existing(seq, p) is not None:
                continue  # (the same state is there: an index evicted for it would be wasted)
            got = self.prefix.reserve()
            if got is None:
                break
            self._forget_snapshot(got[1])
            self._release_checkpoint(got[1])
            if got[0] in self.ops.export_ckpts:  # (its new state is exported once it lands)
                self.ops.export_ckpts.remove(got[0])
            emits.append((p, got[0]))
        return tuple(sorted(emits))

    def land_emits(self, seq: Sequence, emits) -> list[SavedCheckpoint]:
        """The segment's message landed: its emitted checkpoints enter the catalog, in position
        order (the prompt's end is the most recently used). Returns them (prompt logprobs)."""
        if seq.seq_id not in self.records:
            self.release_emits(emits)
            return []
        made = []
        for i, (p, c) in enumerate(emits):
            try:  # (one there already holds the same state: prompt logprobs may stay beside it)
                made.append(self._register(seq, p, reserved=c) or self._existing(seq, p))
            except BaseException:  # (the request fails; the rest of its indices are free again)
                self.release_emits(emits[i:])
                raise
        return [_saved(seq, cp) for cp in made if cp is not None]

    def release_emits(self, emits) -> None:
        """The segment's message failed (or its sequence is gone): the indices are free again."""
        for _, c in emits if self.prefix is not None else ():
            self.prefix.unreserve(c)

    # ---- saved by the next message ------------------------------------------------------------
    def save(self, seq: Sequence, length: int, snapshot: bool = False) -> None:
        """A checkpoint of `seq` after `length` tokens, saved from its slot by the next message.
        A `snapshot` (a decoding sequence's, kept for recovery) supersedes its previous one once
        the message saving it lands; so does its last state when it ends (unless that is the
        snapshot itself)."""
        if self.records.get(seq.seq_id) is None or seq.slot is None or length < 1:
            return
        cp = self._register(seq, length)
        if cp is None:
            return
        self.ops.saves.append((seq.slot, cp.ckpt))
        self.ops.saved.append(_saved(seq, cp))
        if snapshot:
            self.snapshots_of[seq.seq_id] = cp

    def _register(self, seq: Sequence, length: int, reserved: int | None = None):
        """Catalog `seq`'s state after `length` tokens (its full blocks up to there landed):
        its tail block held, exported with snapshots; None when it exists already (or no index
        is free). An emitted one is exported by the next message (it landed: its state is
        there); a saved one by the message that saves it."""
        if self.prefix is None:
            return None
        rec, bs = self.records[seq.seq_id], self.block_size
        tail = rec.blocks[length // bs] if length % bs else None
        chain, tail_tokens = self._key(seq, length)
        cp, evicted = self.prefix.add(chain, tail_tokens, length, tail, reserved)
        self._forget_snapshot(evicted)
        self._release_checkpoint(evicted)
        if cp is None:
            return None
        if tail is not None:
            self.blocks.share(tail)
        if (old := self.snapshots_of.pop(seq.seq_id, None)) is not None:
            self.ops.superseded.append(old)
        if self.ops.exports_ckpts and tail is not None:  # its positions < length are final now
            self.ops.export_blocks.append(tail)
        if self.ops.exports_ckpts and reserved is not None:
            self.ops.export_ckpts.append(cp.ckpt)
        return cp

    def _key(self, seq: Sequence, length: int) -> tuple:
        """The catalog key of `seq`'s state after `length` tokens: (chain key of its full
        blocks, the tokens past them)."""
        rec, bs = self.records[seq.seq_id], self.block_size
        full = length // bs
        done = min(full, len(rec.keys))  # blocks committed already: their keys are known
        chain = rec.keys[done - 1] if done else rec.root
        for i in range(done, full):
            chain = chain_key(chain, tokens_of(seq, i * bs, bs))
        return chain, tuple(tokens_of(seq, full * bs, length % bs))

    def _existing(self, seq: Sequence, length: int):
        return self.prefix.get(self._key(seq, length)) if self.prefix is not None else None

    # ---- going -----------------------------------------------------------------------------
    def drop_superseded(self, superseded: tuple[Checkpoint, ...]) -> None:
        """The message that saved their successors landed: older snapshots go (those still
        there: one evicted meanwhile, its index maybe reused, is left alone)."""
        for cp in superseded if self.prefix is not None else ():
            self._release_checkpoint(self.prefix.supersede(cp))

    def _forget_snapshot(self, cp: Checkpoint | None) -> None:
        if cp is not None:
            self.snapshots_of = {k: v for k, v in self.snapshots_of.items() if v != cp}

    def _release_checkpoint(self, cp: Checkpoint | None) -> None:
        if cp is not None and cp.tail_block is not None:
            self.blocks.free([cp.tail_block])

    def keep_logprobs(self, saved: SavedCheckpoint, k: int, entries: list, nxt: int) -> None:
        if self.prefix is not None:
            self.prefix.keep_logprobs(saved.ckpt, saved.length, k, entries, nxt)


def _saved(seq: Sequence, cp: Checkpoint) -> SavedCheckpoint:
    return SavedCheckpoint(seq.seq_id, seq.request_id, seq.index, cp.ckpt, cp.length)
