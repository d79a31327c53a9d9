"""The small protocol through which the engine uses a cluster prefix tier. Pure Python.

A prefix tier holds checkpoints (Mamba state after `length` tokens, plus the KV block with the
tokens past its last full block) and full KV blocks, content-addressed by the same SHA-256 chain
keys as the local cache (`blocks.py`), in a store that outlives any one engine. The engine asks it
about a prompt whose local match is short (`lookup`), has the stages import what it found
(`fetch`), and hands it what the stages exported once a step landed (`publish`). The runtime
registers the one implementation (`runtime/prefix_tier.py`, a detached Ray actor); the engine
imports none.

Cost model (`worth_importing`): an import costs a fixed round trip (the lookup and one import
call per stage, about what prefilling `prefix_tier_min_tokens` tokens costs) plus the bytes it
moves through the object store; recomputing costs the tokens it saves. Jamba's state per token is
small (KV of one layer in eight; the Mamba checkpoint is a fixed size), so past the fixed cost an
import wins: it is taken when the tokens saved are at least `min_tokens` plus the bytes over
`BYTES_PER_TOKEN`, the bytes a host copy moves (~10 GB/s) in the time a large model prefills one
token (~10K tokens/s on one GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .blocks import Key

BYTES_PER_TOKEN = 2**20


def worth_importing(tokens_saved: int, nbytes: int, min_tokens: int) -> bool:
    return tokens_saved >= min_tokens + nbytes // BYTES_PER_TOKEN


@dataclass(frozen=True, slots=True)
class TierCheckpoint:
    """One checkpoint a step exported, as the tier files it."""

    item: int  # its position among the step's exported items
    chain: Key
    tail: tuple[int, ...]
    length: int
    tail_item: int | None  # the position of its tail block's export (None: no tail block)


@dataclass(frozen=True, slots=True)
class Publication:
    """What a landed step's exports are, for the tier: checkpoints and full blocks by key."""

    checkpoints: tuple[TierCheckpoint, ...] = ()
    blocks: tuple[tuple[int, Key], ...] = ()  # (item position, chain key)

    def __bool__(self) -> bool:
        return bool(self.checkpoints or self.blocks)


@dataclass(frozen=True, slots=True)
class TierHit:
    """The longest checkpoint the tier holds for a prompt."""

    length: int
    chain: Key
    tail: tuple[int, ...]
    num_blocks: int  # its full blocks: the prompt's first num_blocks block keys
    nbytes: int  # what importing all of it moves
    handle: object  # the tier's references to the stored state (opaque here)


class PrefixTier(Protocol):
    def lookup(self, root: Key, keys: list[Key], tokens: list[int], local: int) -> TierHit | None:
        """The tier's longest checkpoint for `tokens` (with full-block `keys` under `root`)
        longer than `local` tokens; None on a miss or when the tier cannot be reached."""

    def fetch(self, hit: TierHit, ckpt: int, blocks: list[tuple[int, int]], tail: int | None):
        """Blocking: every stage imports the hit's checkpoint into index `ckpt`, the hit's full
        blocks (block index, position among the hit's blocks) and its tail block into `tail`.
        True when every stage did."""

    def landed_exports(self) -> object:
        """The pipeline's references to what the step that just landed exported (or None)."""

    def publish(self, exports: object, publication: Publication) -> None:
        """Hand the tier a landed step's `exports` (asynchronous: never blocks, never raises)."""

    def stats(self) -> dict:
        """The tier's numbers (blocking; {} when it cannot be reached)."""


# (config, pipeline) -> a tier client
_TIERS: dict[str, Callable[..., PrefixTier]] = {}


def register_tier(backend: str, factory: Callable[..., PrefixTier]) -> None:
    _TIERS[backend] = factory


def tier_for(backend: str) -> Callable[..., PrefixTier] | None:
    """The tier client factory of a pipeline backend (None: that backend has no tier)."""
    return _TIERS.get(backend)
