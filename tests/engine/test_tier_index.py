"""The prefix tier's bookkeeping (engine/tier_index.py): content addressing, a checkpoint found
only with all its full blocks, and least-recently-used eviction within a byte budget. Pure."""

from __future__ import annotations

from jamba_ray.engine.blocks import UNSALTED, block_keys, root_key
from jamba_ray.engine.tier_index import TierIndex

BS = 4


def file_prefix(index: TierIndex, tokens: list[int], length: int, nbytes: int = 10) -> None:
    """A checkpoint after `length` tokens and its full blocks, as a publish would."""
    keys = block_keys(tokens, BS, length)
    for k in keys:
        index.put_block(k, nbytes, f"block:{k.hex()[:6]}")
    j = length // BS
    chain = keys[-1] if j else UNSALTED
    index.put_checkpoint(chain, tokens[j * BS : length], length, nbytes, f"ckpt:{length}")


def test_longest_checkpoint_with_all_its_blocks_is_found():
    index = TierIndex(budget_bytes=10_000, block_size=BS)
    tokens = list(range(1, 20))
    file_prefix(index, tokens, 6)
    file_prefix(index, tokens, 13)
    keys = block_keys(tokens, BS, len(tokens) - 1)
    found = index.lookup(UNSALTED, keys, tokens)
    assert (found.length, found.checkpoint, len(found.blocks)) == (13, "ckpt:13", 3)
    assert found.nbytes == 40
    # only longer than what the replica has: 13 is not longer than 13
    assert index.lookup(UNSALTED, keys, tokens, longer_than=13) is None
    # a checkpoint must leave one token to run: a prompt of exactly 13 tokens gets the 6
    assert index.lookup(UNSALTED, keys[:3], tokens[:13]).length == 6
    # another salt is another chain: nothing
    salted = block_keys(tokens, BS, len(tokens) - 1, root_key("tenant"))
    assert index.lookup(root_key("tenant"), salted, tokens) is None
    # a token diverging inside the second block: neither checkpoint's tokens begin the prompt
    other = tokens[:5] + [99] + tokens[6:]
    assert index.lookup(UNSALTED, block_keys(other, BS, len(other) - 1), other) is None
    assert index.stats()["hits"] == 2 and index.stats()["misses"] == 3


def test_shared_blocks_are_stored_once():
    index = TierIndex(budget_bytes=10_000, block_size=BS)
    a, b = list(range(1, 14)), list(range(1, 9)) + [50, 51, 52, 53, 54]
    file_prefix(index, a, 12)
    file_prefix(index, b, 12)  # shares a's first two blocks
    st = index.stats()
    assert (st["entries"], st["blocks"], st["bytes"]) == (2, 4, 60)


def test_byte_budget_evicts_least_recently_used_first():
    index = TierIndex(budget_bytes=100, block_size=BS)
    old, mid, new = ([t] * 9 for t in (1, 2, 3))
    file_prefix(index, old, 8, nbytes=10)  # 2 blocks + checkpoint: 30 bytes
    file_prefix(index, mid, 8, nbytes=10)
    file_prefix(index, new, 8, nbytes=10)  # 90 of 100
    # a lookup makes `old` (its checkpoint and blocks) the most recently used
    assert index.lookup(UNSALTED, block_keys(old, BS, 8), old).length == 8
    evicted = index.put_block(b"x" * 32, 25, "big")  # 115 > 100: `mid` goes, oldest first
    assert evicted == [f"block:{k.hex()[:6]}" for k in block_keys(mid, BS, 8)]
    assert index.stats()["bytes"] <= 100 and index.stats()["evictions"] == 2
    # `mid`'s checkpoint is still filed, but without its blocks it is not found
    assert index.lookup(UNSALTED, block_keys(mid, BS, 8), mid) is None
    assert index.lookup(UNSALTED, block_keys(old, BS, 8), old) is not None
    assert index.lookup(UNSALTED, block_keys(new, BS, 8), new) is not None
    # something larger than the whole budget is refused, and evicts nothing
    assert index.put_block(b"y" * 32, 101, "huge") == [] and index.stats()["rejected"] == 1
