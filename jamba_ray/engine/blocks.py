"""KV blocks: a free list with refcounts, and full blocks shared by the key of their tokens. Pure.

Every stage holds the same block numbering; the engine alone hands blocks out. A full block's key
is a SHA-256 over its parent's key and its tokens (vLLM's default since its prefix-cache collision
advisory): equal keys mean equal token prefixes, and no prompt can be crafted to collide with
another. A request's `cache_salt` seeds the chain, so only requests with the same salt share a
prefix. A block nobody references but whose key is known stays cached (least recently used first
out) until its memory is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

Key = bytes  # a 32-byte SHA-256 digest

UNSALTED: Key = b""  # the chain's root when a request gives no cache_salt


def root_key(salt: str | None) -> Key:
    """The parent of a prompt's first block: its `cache_salt` mixed in, or nothing."""
    if salt is None:
        return UNSALTED
    return hashlib.sha256(b"jamba-ray cache_salt\x00" + salt.encode()).digest()


def chain_key(parent: Key, tokens) -> Key:
    h = hashlib.sha256(parent)
    h.update(array("q", tokens).tobytes())  # fixed-width: (1, 23) and (12, 3) differ
    return h.digest()


def block_keys(tokens: list[int], block_size: int, upto: int | None = None, root=UNSALTED):
    """Chained keys of the full blocks of tokens[:upto]."""
    n = len(tokens) if upto is None else upto
    keys, parent = [], root
    for i in range(n // block_size):
        parent = chain_key(parent, tokens[i * block_size : (i + 1) * block_size])
        keys.append(parent)
    return keys


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._key_of: list[Key | None] = [None] * num_blocks
        self._by_key: dict[Key, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, keyed: evictable

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._by_key)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int = 1) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")
        return [self._take() for _ in range(n)]

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently used cached block
            block, _ = self._cached.popitem(last=False)
            del self._by_key[self._key_of[block]]
            self._key_of[block] = None
        self._refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of `block` (a fork's prefix, a prefix-cache hit, a checkpoint)."""
        if self._refs[block] == 0:
            self._cached.pop(block)
        self._refs[block] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed twice or never allocated")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self._key_of[b] is None:
                    self._free.append(b)
                else:
                    self._cached[b] = None

    def commit(self, block: int, key: Key) -> bool:
        """`block` is full and holds the tokens `key` names: others may reuse it from now on.
        False when it, or another block with these tokens, is already committed."""
        if self._key_of[block] is None and key not in self._by_key:
            self._key_of[block], self._by_key[key] = key, block
            return True
        return False

    def uncommit(self, block: int) -> None:
        """Forget `block`'s key (its content cannot be trusted everywhere): no one reuses it."""
        key, self._key_of[block] = self._key_of[block], None
        if key is None:
            return
        del self._by_key[key]
        if block in self._cached:  # a cached block without a key is a free one
            del self._cached[block]
            self._free.append(block)

    def committed(self, block: int) -> bool:
        return self._key_of[block] is not None

    def key_of(self, block: int) -> Key | None:
        return self._key_of[block]

    def committed_blocks(self) -> set[int]:
        return set(self._by_key.values())

    def recent_keys(self, limit: int) -> list[Key]:
        """Up to `limit` keys of cached full blocks, those in use first, then the evictable ones
        most recently released first (the last to be evicted): a replica's routing report."""
        in_use = [k for k, b in self._by_key.items() if self._refs[b] > 0]
        idle = [self._key_of[b] for b in reversed(self._cached)]
        return (in_use + idle)[:limit]

    def lookup(self, key: Key) -> int | None:
        return self._by_key.get(key)

    def touch(self, block: int) -> None:
        if block in self._cached:
            self._cached.move_to_end(block)

    def drop_cache(self) -> None:
        """Forget every key (after a stage lost its KV): cached blocks become plain free ones."""
        for block in self._cached:
            self._free.append(block)
        self._cached.clear()
        self._by_key.clear()
        self._key_of = [None] * self.num_blocks

    def refs(self, block: int) -> int:
        return self._refs[block]
