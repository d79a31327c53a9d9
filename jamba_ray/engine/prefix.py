"""Prefix reuse: Mamba checkpoints at exact token positions over hash-shared KV blocks. Pure Python.

A checkpoint is the conv/SSM state of every stage's Mamba layers after `length` tokens, kept in
each stage's checkpoint pool, plus a hold on the KV block with the tokens past the last full block
(full blocks are found by hash). A new sequence resumes from the longest checkpoint whose tokens
begin its prompt and whose full blocks are all still cached, and prefills only the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .blocks import BlockAllocator, block_hashes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    ckpt: int  # index in every stage's checkpoint pool
    length: int  # tokens it covers
    chain: int | None  # hash of its full blocks (None: it is shorter than one block)
    tail: tuple[int, ...]  # tokens past its last full block
    tail_block: int | None  # the KV block holding them (held while the checkpoint lives)


@dataclass(frozen=True, slots=True)
class Match:
    checkpoint: Checkpoint
    blocks: list[int]  # the cached full blocks, in order
    hashes: list[int]  # their chained hashes


class PrefixCache:
    def __init__(self, blocks: BlockAllocator, num_checkpoints: int):
        self.blocks = blocks
        self._free = list(range(num_checkpoints - 1, -1, -1))
        self._lru: OrderedDict[tuple[int | None, tuple[int, ...]], Checkpoint] = OrderedDict()
        self.queries = self.hits = 0  # prompt tokens looked up / found
        # checkpoint -> (k, prompt-logprob entries of positions 0..length): scoring resumes too
        self.logprobs: dict[int, tuple[int, list]] = {}
        self._pins: dict[int, int] = {}  # checkpoint -> restores not sent yet

    @property
    def num_checkpoints(self) -> int:
        return len(self._lru)

    @property
    def num_held_blocks(self) -> int:
        """Tail blocks the checkpoints hold (counted as in use): distinct ones, since checkpoints
        of one sequence within one block share it."""
        return len({cp.tail_block for cp in self._lru.values()} - {None})

    def match(self, tokens: list[int], logprobs_k: int | None = None) -> Match | None:
        """The longest usable checkpoint that leaves at least one token of `tokens` to run
        (the last prompt token's logits are what the first sample is drawn from); with
        `logprobs_k`, only one that kept the prompt logprobs (top-k) of the tokens it covers."""
        self.queries += len(tokens)
        bs, best = self.blocks.block_size, None
        hashes = block_hashes(tokens, bs, len(tokens) - 1)
        cached: list[int] = []
        for j in range(len(hashes) + 1):  # j full blocks, all cached
            chain = hashes[j - 1] if j else None
            if j and (block := self.blocks.lookup(chain)) is None:
                break
            if j:
                cached.append(block)
            best = self._best_tail(tokens, j * bs, chain, cached, hashes[:j], best, logprobs_k)
        if best is not None:
            self.hits += best.checkpoint.length
            self._lru.move_to_end((best.checkpoint.chain, best.checkpoint.tail))
        return best

    def _best_tail(self, tokens, start, chain, cached, hashes, best, logprobs_k) -> Match | None:
        limit = len(tokens) - 1
        for n in range(min(limit - start, self.blocks.block_size - 1), -1, -1):
            cp = self._lru.get((chain, tuple(tokens[start : start + n])))
            if cp is None or (
                logprobs_k is not None and self.logprobs.get(cp.ckpt, (None,))[0] != logprobs_k
            ):
                continue
            if best is None or cp.length > best.checkpoint.length:
                return Match(cp, list(cached), hashes)
        return best

    def save(
        self, tokens: list[int], length: int, tail_block: int | None, chain: int | None = None
    ) -> Checkpoint | None:
        """Keep the state after tokens[:length] (when not kept already): the new checkpoint,
        whose index the stages then fill from the sequence's slot, or None when it exists (or
        every index is pinned). `chain`: the hash of its full blocks when the caller holds it
        (else computed from `tokens`)."""
        bs = self.blocks.block_size
        full = length // bs
        if chain is None and full:
            chain = block_hashes(tokens, bs, full * bs)[-1]
        key = (chain, tuple(tokens[full * bs : length]))
        if key in self._lru:
            return None
        ckpt = self._free.pop() if self._free else self._evict()
        if ckpt is None:
            return None
        tail = tail_block if length % bs else None
        if tail is not None:
            self.blocks.share(tail)
        cp = self._lru[key] = Checkpoint(ckpt, length, chain, key[1], tail)
        return cp

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

    def _evict(self) -> int | None:
        """The least recently used unpinned checkpoint's index, freed for reuse."""
        key = next((k for k, cp in self._lru.items() if cp.ckpt not in self._pins), None)
        if key is None:
            return None
        return self._drop(key)

    def _drop(self, key) -> int:
        cp = self._lru.pop(key)
        if cp.tail_block is not None:
            self.blocks.free([cp.tail_block])
        self.logprobs.pop(cp.ckpt, None)
        return cp.ckpt

    def discard(self, ckpts: set[int]) -> None:
        """Drop these checkpoints: their state did not reach every stage."""
        for key in [k for k, cp in self._lru.items() if cp.ckpt in ckpts]:
            self._free.append(self._drop(key))

    def supersede(self, cp: Checkpoint) -> None:
        """Drop `cp` (a newer snapshot of its sequence landed) if it is still there and no one
        is about to restore it."""
        key = (cp.chain, cp.tail)
        if self._lru.get(key) == cp and cp.ckpt not in self._pins:
            self._free.append(self._drop(key))

    def keep_logprobs(self, ckpt: int, length: int, k: int, entries: list) -> None:
        """Prompt-logprob entries of positions 0..length, beside the checkpoint at `length`."""
        if any(cp.ckpt == ckpt and cp.length == length for cp in self._lru.values()):
            self.logprobs[ckpt] = (k, entries[: length + 1])

    def clear(self) -> None:
        """Drop every checkpoint and block hash (a stage that held them was replaced)."""
        self._pins.clear()
        while self._lru:
            self._free.append(self._drop(next(iter(self._lru))))
        self.blocks.drop_cache()
