"""The prefix tier's bookkeeping: what it holds, by key, within a byte budget. Pure Python.

Full KV blocks are filed once by their chain key (entries sharing a prefix share them) and
checkpoints by (chain key of their full blocks, tail tokens), the local catalog's key. One least
recently used order runs over both; a put that overflows the budget evicts from its old end. As
in the local cache, a checkpoint is found only while all its full blocks are there. The values
(each stage's stored parts) are opaque here; evicting drops them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .blocks import Key


@dataclass(slots=True)
class Stored:
    nbytes: int
    value: object  # the stored state (the tier actor's object refs)
    length: int = 0  # a checkpoint: the tokens it covers


@dataclass(frozen=True, slots=True)
class Found:
    length: int
    chain: Key
    tail: tuple[int, ...]
    checkpoint: object  # its value
    blocks: list  # the values of its full blocks, in order
    nbytes: int


class TierIndex:
    def __init__(self, budget_bytes: int, block_size: int):
        self.budget, self.block_size = budget_bytes, block_size
        # ("b", key) for a block, ("c", chain, tail) for a checkpoint
        self._lru: OrderedDict[tuple, Stored] = OrderedDict()
        self.nbytes = 0
        self.counters = dict.fromkeys(("hits", "misses", "evictions", "puts", "rejected"), 0)

    def has_block(self, key: Key) -> bool:
        return ("b", key) in self._lru

    def has_checkpoint(self, chain: Key, tail: tuple[int, ...]) -> bool:
        return ("c", chain, tuple(tail)) in self._lru

    def put_block(self, key: Key, nbytes: int, value: object) -> list:
        return self._put(("b", key), Stored(nbytes, value))

    def put_checkpoint(self, chain: Key, tail, length: int, nbytes: int, value: object) -> list:
        return self._put(("c", chain, tuple(tail)), Stored(nbytes, value, length))

    def _put(self, key: tuple, item: Stored) -> list:
        """File `item` (or refresh the one there); returns the values evicted for it."""
        if key in self._lru:
            self._lru.move_to_end(key)
            return []
        if item.nbytes > self.budget:
            self.counters["rejected"] += 1
            return []
        self._lru[key] = item
        self.nbytes += item.nbytes
        self.counters["puts"] += 1
        evicted = []
        while self.nbytes > self.budget:
            _, old = self._lru.popitem(last=False)  # (never `item`: it alone fits)
            self.nbytes -= old.nbytes
            self.counters["evictions"] += 1
            evicted.append(old.value)
        return evicted

    def lookup(self, root: Key, keys: list[Key], tokens: list[int], longer_than: int = 0):
        """The longest checkpoint for `tokens` that leaves one token to run, covers more than
        `longer_than` tokens, and whose full blocks (`keys`, chained from `root`) are all here;
        it and its blocks become the most recently used. None if there is none."""
        bs, limit, best = self.block_size, len(tokens) - 1, None
        for j in range(len(keys) + 1):
            chain = keys[j - 1] if j else root
            if j and ("b", chain) not in self._lru:
                break
            for n in range(min(limit - j * bs, bs - 1), -1, -1):
                tail = tuple(tokens[j * bs : j * bs + n])
                cp = self._lru.get(("c", chain, tail))
                if cp is not None and cp.length > max(longer_than, best[0] if best else 0):
                    best = (cp.length, j, chain, tail)
                    break
        if best is None:
            self.counters["misses"] += 1
            return None
        self.counters["hits"] += 1
        length, j, chain, tail = best
        cp = self._lru[("c", chain, tail)]
        self._lru.move_to_end(("c", chain, tail))
        blocks = []
        for key in keys[:j]:
            self._lru.move_to_end(("b", key))
            blocks.append(self._lru[("b", key)])
        nbytes = cp.nbytes + sum(b.nbytes for b in blocks)
        return Found(length, chain, tail, cp.value, [b.value for b in blocks], nbytes)

    def stats(self) -> dict:
        n_blocks = sum(1 for k in self._lru if k[0] == "b")
        return {
            "entries": len(self._lru) - n_blocks,
            "blocks": n_blocks,
            "bytes": self.nbytes,
            "budget_bytes": self.budget,
            **self.counters,
        }
