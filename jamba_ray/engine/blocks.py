"""KV blocks: a free list with refcounts, and full blocks shared by the hash of their tokens. Pure.

Every stage holds the same block numbering; the engine alone hands blocks out. A full block's hash
chains its parent's, so equal hashes mean equal token prefixes. A block nobody references but
whose hash is known stays cached (least recently used first out) until its memory is needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


def block_hashes(tokens: list[int], block_size: int, upto: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of tokens[:upto]."""
    n = len(tokens) if upto is None else upto
    hashes, parent = [], None
    for i in range(n // block_size):
        parent = chain_hash(parent, tuple(tokens[i * block_size : (i + 1) * block_size]))
        hashes.append(parent)
    return hashes


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, hashed: evictable

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

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
            del self._by_hash[self._hash_of[block]]
            self._hash_of[block] = None
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
                if self._hash_of[b] is None:
                    self._free.append(b)
                else:
                    self._cached[b] = None

    def commit(self, block: int, h: int) -> bool:
        """`block` is full and holds the tokens `h` names: others may reuse it from now on.
        False when it, or another block with these tokens, is already committed."""
        if self._hash_of[block] is None and h not in self._by_hash:
            self._hash_of[block], self._by_hash[h] = h, block
            return True
        return False

    def uncommit(self, block: int) -> None:
        """Forget `block`'s hash (its content cannot be trusted everywhere): no one reuses it."""
        h, self._hash_of[block] = self._hash_of[block], None
        if h is None:
            return
        del self._by_hash[h]
        if block in self._cached:  # a cached block without a hash is a free one
            del self._cached[block]
            self._free.append(block)

    def committed(self, block: int) -> bool:
        return self._hash_of[block] is not None

    def committed_blocks(self) -> set[int]:
        return set(self._by_hash.values())

    def lookup(self, h: int) -> int | None:
        return self._by_hash.get(h)

    def touch(self, block: int) -> None:
        if block in self._cached:
            self._cached.move_to_end(block)

    def drop_cache(self) -> None:
        """Forget every hash (after a stage lost its KV): cached blocks become plain free ones."""
        for block in self._cached:
            self._free.append(block)
        self._cached.clear()
        self._by_hash.clear()
        self._hash_of = [None] * self.num_blocks

    def refs(self, block: int) -> int:
        return self._refs[block]
