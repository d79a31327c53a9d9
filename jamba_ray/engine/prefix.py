"""The checkpoint catalog: which Mamba checkpoints exist, at which exact token positions. Pure.

A checkpoint is the conv/SSM state of every stage's Mamba layers after `length` tokens, kept in
each stage's checkpoint pool, plus (owned by the KV cache) a hold on the KV block with the tokens
past its last full block. Its key is the chain key of its full blocks and those tail tokens
verbatim. A new sequence resumes from the longest checkpoint whose tokens begin its prompt and
whose full blocks are all still cached. This catalog never changes a block's refcount: what it
drops, it returns, and the KV cache releases the tail blocks.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from .blocks import UNSALTED, BlockAllocator, Key, block_keys

# the most of the catalog that checkpoints which served a resume keep from eviction
PROTECTED = 0.75


@dataclass(frozen=True, slots=True)
class Checkpoint:
    ckpt: int  # index in every stage's checkpoint pool
    length: int  # tokens it covers
    chain: Key  # key of its full blocks (the salted root when it is shorter than one block)
    tail: tuple[int, ...]  # tokens past its last full block
    tail_block: int | None  # the KV block holding them (held while the checkpoint lives)

    @property
    def key(self) -> tuple[Key, tuple[int, ...]]:
        return self.chain, self.tail


@dataclass(frozen=True, slots=True)
class Match:
    checkpoint: Checkpoint
    blocks: list[int]  # the cached full blocks, in order
    keys: list[Key]  # their chained keys


@dataclass(frozen=True, slots=True)
class Lookup:
    match: Match | None  # the checkpoint to resume from, if any
    reach: int  # tokens in the cached full blocks the prompt begins with (at most len - 1)


class PrefixCache:
    def __init__(self, blocks: BlockAllocator, num_checkpoints: int):
        self.blocks = blocks  # read only: lookups of cached full blocks
        self._free = list(range(num_checkpoints - 1, -1, -1))
        self._lru: OrderedDict[tuple[Key, tuple[int, ...]], Checkpoint] = OrderedDict()
        self.queries = self.hits = 0  # prompt tokens looked up / found
        # checkpoint -> (k, prompt-logprob entries of positions 0..length): scoring resumes too
        self.logprobs: dict[int, tuple[int, list]] = {}
        self._pins: dict[int, int] = {}  # checkpoint -> restores not sent yet
        # indices a message in flight emits into: neither matchable nor evictable until it lands
        self._reserved: set[int] = set()
        self._used: set[int] = set()  # checkpoints that served a resume (evicted last)

    @property
    def num_checkpoints(self) -> int:
        return len(self._lru)

    def get(self, key: tuple[Key, tuple[int, ...]]) -> Checkpoint | None:
        return self._lru.get(key)

    def checkpoints(self) -> list[Checkpoint]:
        return list(self._lru.values())

    def match(self, tokens: list[int], root: Key = UNSALTED, logprobs_k=None) -> Match | None:
        """The longest usable checkpoint that leaves at least one token of `tokens` to run
        (the last prompt token's logits are what the first sample is drawn from); with
        `logprobs_k`, only one that kept the prompt logprobs (top-k) of the tokens it covers."""
        return self.lookup(tokens, root, logprobs_k).match

    def lookup(self, tokens: list[int], root: Key = UNSALTED, logprobs_k=None) -> Lookup:
        """`match`, and how far the cached full blocks reach (a prefill emits a checkpoint there
        when that is past the match: a junction later requests resume from)."""
        self.queries += len(tokens)
        bs, best = self.blocks.block_size, None
        keys = block_keys(tokens, bs, len(tokens) - 1, root)
        cached: list[int] = []
        for j in range(len(keys) + 1):  # j full blocks, all cached
            chain = keys[j - 1] if j else root
            if j and (block := self.blocks.lookup(chain)) is None:
                break
            if j:
                cached.append(block)
            best = self._best_tail(tokens, j * bs, chain, cached, keys[:j], best, logprobs_k)
        if best is not None:
            self.hits += best.checkpoint.length
            self._lru.move_to_end(best.checkpoint.key)
            self._used.add(best.checkpoint.ckpt)
        return Lookup(best, len(cached) * bs)

    def _best_tail(self, tokens, start, chain, cached, keys, best, logprobs_k) -> Match | None:
        limit = len(tokens) - 1
        for n in range(min(limit - start, self.blocks.block_size - 1), -1, -1):
            cp = self._lru.get((chain, tuple(tokens[start : start + n])))
            if cp is None or (logprobs_k is not None and not self._kept(cp, logprobs_k, tokens)):
                continue
            if best is None or cp.length > best.checkpoint.length:
                return Match(cp, list(cached), keys)
        return best

    def _kept(self, cp: Checkpoint, k: int, tokens: list[int]) -> bool:
        """`cp` kept the top-`k` prompt logprobs of its tokens and of the one after, `tokens`'."""
        kept = self.logprobs.get(cp.ckpt)
        return kept is not None and kept[0] == k and kept[2] == tokens[cp.length]

    def add(
        self,
        chain: Key,
        tail: tuple[int, ...],
        length: int,
        tail_block: int | None,
        reserved: int | None = None,
    ) -> tuple[Checkpoint | None, Checkpoint | None]:
        """A new checkpoint (the stages fill its index from a slot, or filled the `reserved` one
        already) and the one evicted for it; (None, None) when it exists already (a reserved
        index is then free again) or every index is pinned. The caller holds `tail_block` for
        the new one and releases the evicted one's."""
        if reserved is not None:
            if reserved not in self._reserved:  # dropped by `clear`: the index is not ours now
                return None, None
            self._reserved.remove(reserved)
        if (chain, tail) in self._lru:
            if reserved is not None:
                self._free.append(reserved)
            return None, None
        evicted = None
        if reserved is not None:
            ckpt = reserved
        elif (got := self._take()) is not None:
            ckpt, evicted = got
        else:
            return None, None
        cp = self._lru[(chain, tail)] = Checkpoint(ckpt, length, chain, tail, tail_block)
        return cp, evicted

    def _take(self) -> tuple[int, Checkpoint | None] | None:
        """A free index, or the least recently used unpinned checkpoint's (returned too)."""
        if self._free:
            return self._free.pop(), None
        evicted = self._evict()
        return None if evicted is None else (evicted.ckpt, evicted)

    def reserve(self) -> tuple[int, Checkpoint | None] | None:
        """An index for a checkpoint a segment emits, and the one evicted for it (the caller
        releases its tail block); None when every index is pinned or reserved. It is neither
        matchable nor evictable until `add` registers it (its message landed) or `unreserve`."""
        got = self._take()
        if got is not None:
            self._reserved.add(got[0])
        return got

    def unreserve(self, ckpt: int) -> None:
        """Its message failed: whatever a stage wrote there is not a checkpoint."""
        if ckpt in self._reserved:  # (not if `clear` freed it already)
            self._reserved.remove(ckpt)
            self._free.append(ckpt)

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def held(self) -> tuple[set[int], set[int]]:
        """Indices of the live checkpoints, and the tail blocks they hold."""
        cps = self._lru.values()
        return {cp.ckpt for cp in cps}, {cp.tail_block for cp in cps if cp.tail_block is not None}

    # A checkpoint a sequence will restore (its segment not sent yet) is pinned: its index must
    # not be refilled before the restore runs.
    def pin(self, ckpt: int) -> None:
        self._pins[ckpt] = self._pins.get(ckpt, 0) + 1

    def unpin(self, ckpt: int) -> None:
        if self._pins.get(ckpt, 0) > 1:
            self._pins[ckpt] -= 1
        else:
            self._pins.pop(ckpt, None)

    def pinned(self, ckpt: int) -> bool:
        return ckpt in self._pins

    def spare_tails(self) -> int:
        """Tail blocks only unpinned checkpoints hold: evicting those frees them."""
        holds = Counter(
            cp.tail_block
            for cp in self._lru.values()
            if cp.tail_block is not None and cp.ckpt not in self._pins
        )
        return sum(1 for b, n in holds.items() if self.blocks.refs(b) == n)

    def evict_for_block(self) -> Checkpoint | None:
        """Under block pressure: the least recently used unpinned checkpoint holding a tail
        block, dropped (its index freed; the caller releases the block)."""
        cp = self._evict(holding_a_block=True)
        if cp is not None:
            self._free.append(cp.ckpt)
        return cp

    def _evict(self, holding_a_block: bool = False) -> Checkpoint | None:
        """The least recently used unpinned checkpoint (one with a tail block, if asked),
        dropped; its index is the caller's. Segmented: one that never served a resume goes
        before one that did while those are at most `PROTECTED` of the catalog, so the
        checkpoint prompts share outlives the one-off ends of those prompts."""
        ok = [
            k
            for k, cp in self._lru.items()
            if cp.ckpt not in self._pins and (cp.tail_block is not None or not holding_a_block)
        ]
        if not ok:
            return None
        if len(self._used) <= PROTECTED * len(self._lru):
            key = next((k for k in ok if self._lru[k].ckpt not in self._used), ok[0])
        else:
            key = ok[0]
        return self._drop(key)

    def _drop(self, key) -> Checkpoint:
        cp = self._lru.pop(key)
        self._used.discard(cp.ckpt)
        self.logprobs.pop(cp.ckpt, None)
        return cp

    def discard(self, ckpts: set[int]) -> list[Checkpoint]:
        """Drop these checkpoints (their state did not reach every stage); returns them."""
        dropped = [self._drop(k) for k in [k for k, cp in self._lru.items() if cp.ckpt in ckpts]]
        self._free += [cp.ckpt for cp in dropped]
        return dropped

    def supersede(self, cp: Checkpoint) -> Checkpoint | None:
        """Drop `cp` (a newer snapshot of its sequence landed) if it is still there and no one
        is about to restore it; returns it when dropped."""
        if self._lru.get(cp.key) == cp and cp.ckpt not in self._pins:
            self._free.append(self._drop(cp.key).ckpt)
            return cp
        return None

    def keep_logprobs(self, ckpt: int, length: int, k: int, entries: list, nxt: int) -> None:
        """Prompt-logprob entries of positions 0..length, beside the checkpoint at `length`.
        The entry at `length` (from the checkpoint's last logits) names the token `nxt` that
        followed: it serves only a prompt with that same token there."""
        if any(cp.ckpt == ckpt and cp.length == length for cp in self._lru.values()):
            self.logprobs[ckpt] = (k, entries[: length + 1], nxt)

    def clear(self) -> list[Checkpoint]:
        """Drop every checkpoint (a stage that held them was replaced, or the engine dropped
        what was in flight: reserved indices are free again); returns them."""
        self._pins.clear()
        self._free += sorted(self._reserved)
        self._reserved.clear()
        return self.discard({cp.ckpt for cp in self._lru.values()})
