"""The engine's side of the cluster prefix tier: what it publishes, and imports at admission.

Publishing: with the tier on, the KV cache exports every checkpoint it saves and every full block
it commits (the recovery-snapshot export, riding the step message: the stages copy them to the host
before the step's segments run). `TieredPipeline` wraps the engine's pipeline: as a message is
submitted, `describe` names its exports by key, from the catalog as it is when the message was
sealed; once the message lands, the exports and that description go to the tier (asynchronously,
off the step's path). Decode snapshots are not published.

Importing: `import_prefix` runs at admission before the local match (`Scheduler.admit`). When the
local match is short of the prompt by enough to pay for an import (`tier_api.worth_importing`), it
asks the tier once; on a hit it takes a checkpoint index and blocks for the full blocks not cached
here, the stages import the bytes, the blocks are committed under their keys and the checkpoint
enters the catalog; the local match then resumes from it as from any cached prefix. Anything
failing leaves nothing behind: the prompt is computed as it would have been. Pure Python.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError
from .blocks import Key, block_keys, root_key
from .messages import StepFailure, StepMessage, StepResult
from .micro_batch import wants_prompt_logprobs
from .pipeline_api import Pipeline
from .prefix import Checkpoint
from .sequence import Sequence
from .tier_api import PrefixTier, Publication, TierCheckpoint, tier_for, worth_importing

log = logging.getLogger(__name__)


class TierLink:
    def __init__(self, kv, client: PrefixTier, min_tokens: int):
        self.kv, self.client, self.min_tokens = kv, client, min_tokens
        self.counters = dict.fromkeys(
            ("tier_lookups", "tier_imports", "tier_imported_tokens", "tier_import_failures"), 0
        )

    # ---- importing ---------------------------------------------------------------------------
    def import_prefix(self, seq: Sequence) -> None:
        """Before `seq`'s local match (the scheduler's admission): a longer prefix from the tier
        enters the local cache if the tier has one worth importing."""
        kv, bs = self.kv, self.kv.block_size
        if kv.prefix is None or wants_prompt_logprobs(seq):  # (the tier keeps no logprobs)
            return
        root = root_key(getattr(seq.params, "cache_salt", None))
        tokens = seq.prompt_ids + seq.output_ids
        if len(tokens) - 1 < self.min_tokens:  # (too short to hash)
            return
        local = _local_length(kv, tokens, root)
        if len(tokens) - 1 - local < self.min_tokens:
            return
        self.counters["tier_lookups"] += 1
        keys = block_keys(tokens, bs, len(tokens) - 1, root)
        hit = self.client.lookup(root, keys, tokens, local)
        if hit is None or not worth_importing(hit.length - local, hit.nbytes, self.min_tokens):
            return
        room_for = kv.blocks.blocks_for(len(tokens)) + len(seq.forks)
        if _import(kv, self.client, hit, keys[: hit.num_blocks], room_for):
            self.counters["tier_imports"] += 1
            self.counters["tier_imported_tokens"] += hit.length
        else:
            self.counters["tier_import_failures"] += 1

    def stats(self) -> dict:
        tier = {f"prefix_tier_{k}": v for k, v in self.client.stats().items()}
        return {**self.counters, **tier}


class TieredPipeline:
    """The engine's pipeline with publishing added: each message's exports are described (by
    key) as it is submitted, and handed to the tier once it lands. Everything else is the
    wrapped pipeline's."""

    def __init__(self, inner: Pipeline, link: TierLink):
        self.inner, self.link = inner, link
        self._pending: dict[object, Publication] = {}  # by result handle

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def submit(self, msg: StepMessage, token_ids: list[int]) -> object:
        pub = describe(self.link.kv, msg) if msg.num_exports else Publication()
        handle = self.inner.submit(msg, token_ids)
        if pub:
            self._pending[handle] = pub
        return handle

    def wait(self, handle: object) -> StepResult | StepFailure:
        return self._landed(handle, self.inner.wait(handle))

    async def wait_async(self, handle: object) -> StepResult | StepFailure:
        return self._landed(handle, await self.inner.wait_async(handle))

    def _landed(self, handle, result):
        pub = self._pending.pop(handle, None)
        if pub is not None and isinstance(result, StepResult):  # (its exports landed with it)
            self.link.client.publish(self.link.client.landed_exports(), pub)
        return result

    def replace(self, indices, trusted=None) -> bool:
        self._pending.clear()  # (nothing is in flight: a failed step's exports are moot)
        return self.inner.replace(indices, trusted)


def attach_tier(core) -> TierLink | None:
    """With `state.prefix_tier`: the engine core publishes to and imports from the cluster tier
    of its pipeline backend (its pipeline is wrapped, its KV cache exports what it saves)."""
    st = core.config.state
    if not st.prefix_tier or core.kv.prefix is None:
        return None
    factory = tier_for(core.config.placement.backend)
    if factory is None:
        raise ConfigError(
            f"prefix_tier needs a backend with a cluster store (ray), not "
            f"{core.config.placement.backend!r}"
        )
    link = TierLink(core.kv, factory(core.config, core.pipeline), st.prefix_tier_min_tokens)
    core.kv.ops.exports_ckpts = True
    core.kv.tier = link
    core.pipeline = TieredPipeline(core.pipeline, link)
    return link


def describe(kv, msg: StepMessage) -> Publication:
    """`msg`'s exported checkpoints (but decode snapshots) and committed full blocks, by key."""
    held = {cp.ckpt: cp for cp in kv.prefix.checkpoints()}
    snaps = set(kv.snapshots_of.values())
    first = len(msg.export_ckpts)
    where = {}  # block -> its first export position
    for i, b in enumerate(msg.export_blocks):
        where.setdefault(b, first + i)
    ckpts = []
    for i, c in enumerate(msg.export_ckpts):
        cp = held.get(c)
        if cp is None or cp in snaps or (cp.tail_block is not None and cp.tail_block not in where):
            continue
        tail = where.get(cp.tail_block) if cp.tail_block is not None else None
        ckpts.append(TierCheckpoint(i, cp.chain, cp.tail, cp.length, tail))
    blocks = [(p, key) for b, p in where.items() if (key := kv.blocks.key_of(b)) is not None]
    return Publication(tuple(ckpts), tuple(blocks))


def _local_length(kv, tokens: list[int], root: Key) -> int:
    """What the local cache would resume (its match counters left as they were)."""
    prefix = kv.prefix
    queries, hits = prefix.queries, prefix.hits
    match = prefix.match(tokens, root)
    prefix.queries, prefix.hits = queries, hits
    return match.checkpoint.length if match is not None else 0


def _import(kv, client: PrefixTier, hit, keys: list[Key], room_for: int) -> bool:
    """Take room, have the stages import the hit, then file it here; False (nothing kept) if
    there is no room or an import failed."""
    stale = [cp for cp in kv.prefix.checkpoints() if cp.key == (hit.chain, hit.tail)]
    if stale:  # here, but some of its blocks were evicted: it is replaced by the import
        if kv.prefix.pinned(stale[0].ckpt):
            return False
        for cp in kv.prefix.discard({stale[0].ckpt}):
            kv._release_checkpoint(cp)
    missing = [i for i, k in enumerate(keys) if kv.blocks.lookup(k) is None]
    for k in keys:  # hold the cached ones while room is made
        if (b := kv.blocks.lookup(k)) is not None:
            kv.blocks.share(b)
    held = [kv.blocks.lookup(k) for k in keys if kv.blocks.lookup(k) is not None]
    need = len(missing) + (1 if hit.tail else 0)
    try:  # (room for the import and for the whole sequence beside it, as admission checked)
        if kv.available() < need + room_for or not kv._make_room(need):
            return False
        new = kv.blocks.allocate(need)
        tail = new[-1] if hit.tail else None
        cp, evicted = kv.prefix.add(hit.chain, hit.tail, hit.length, tail)
        kv._release_checkpoint(evicted)
        if cp is None:
            kv.blocks.free(new)
            return False
        _drop_pending(kv, cp, evicted)
        ok = client.fetch(hit, cp.ckpt, list(zip(new, missing)), tail)
        if not ok:
            kv.prefix.discard({cp.ckpt})
            kv.blocks.free(new)
            return False
        for b, i in zip(new, missing):
            kv.blocks.commit(b, keys[i])
        kv.blocks.free(new[: len(missing)])  # cached now; the checkpoint holds its tail block
        return True
    finally:
        kv.blocks.free(held)


def _drop_pending(kv, cp: Checkpoint, evicted: Checkpoint | None) -> None:
    """A save still pending into the index the import fills would overwrite the import."""
    ops = kv.ops
    ops.saves = [(s, c) for s, c in ops.saves if c != cp.ckpt]
    ops.saved = [s for s in ops.saved if s.ckpt != cp.ckpt]
    if evicted is not None:
        kv.snapshots_of = {k: v for k, v in kv.snapshots_of.items() if v != evicted}
