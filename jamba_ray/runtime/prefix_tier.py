"""The cluster prefix tier: a named, detached Ray actor that owns published state, and the client
an engine talks to it through (`engine/tier_api.py`'s protocol).

Ray ownership decides what outlives a replica: an object belongs to the process that made it, and
the exports a replica's driver takes from its stages die with that driver. So the tier actor
`ray.put`s what it files: it owns those objects, and they live as long as it does (spilled to
disk by the object store under pressure), whichever replica published them. An importing replica
borrows the references and hands them straight to its stages (`Stage.import_state`): the bytes go
from the object store to each stage without passing through the replica.

One tier per model and stage layout (its name digests them; states of different layer splits,
block sizes or dtypes do not mix); keys are chain keys, salted as the requests were, so the tier
itself knows no salt. The first engine to start it sets its byte budget. Every failure on the
client's side (the actor gone, an object lost, a timeout) is logged and answered as a miss; the
client then leaves the tier alone for `RETRY_S` before looking for it again.
"""

from __future__ import annotations

import hashlib
import logging
import time

import ray

from ..engine.tier_api import Publication, TierHit
from ..engine.tier_index import TierIndex
from .pipeline import call

log = logging.getLogger(__name__)

NAMESPACE = "jamba_ray"
LOOKUP_TIMEOUT_S, FETCH_TIMEOUT_S, RETRY_S = 5.0, 60.0, 30.0


def _nbytes(parts) -> int:
    return sum(t.numel() * t.element_size() for t in parts)


class PrefixTierStore:
    """The actor: a `TierIndex` whose values are, per stage, object refs this actor put."""

    def __init__(self, budget_bytes: int, block_size: int):
        self.index = TierIndex(budget_bytes, block_size)

    def publish(self, pub: Publication, exports: list[list]) -> int:
        """`exports[stage][item]`: refs to a landed step's exports (borrowed from the publishing
        driver); those `pub` names and this tier lacks are fetched (at once) and filed. Returns
        how many were filed."""
        blocks = [(i, k) for i, k in pub.blocks if not self.index.has_block(k)]
        ckpts = [c for c in pub.checkpoints if not self.index.has_checkpoint(c.chain, c.tail)]
        tails = {c.tail_item for c in ckpts if c.tail_item is not None}
        owned = self._own(exports, sorted({i for i, _ in blocks} | {c.item for c in ckpts} | tails))
        if owned is None:
            return 0
        for item, key in blocks:
            parts = owned[item]
            self.index.put_block(key, sum(n for n, _ in parts), [r for _, r in parts])
        for c in ckpts:
            ckpt, tail = owned[c.item], owned[c.tail_item] if c.tail_item is not None else []
            value = {"ckpt": [r for _, r in ckpt], "tail": [r for _, r in tail] or None}
            self.index.put_checkpoint(
                c.chain, c.tail, c.length, sum(n for n, _ in ckpt + tail), value
            )
        return len(blocks) + len(ckpts)

    def _own(self, exports: list[list], items: list[int]) -> dict[int, list] | None:
        """item -> (bytes, a ref this actor owns) per stage; None if one was lost."""
        try:
            values = ray.get([stage[i] for i in items for stage in exports])
        except ray.exceptions.RayError as e:
            log.warning("a published export was lost: %s", e)
            return None
        n = len(exports)
        return {
            item: [(_nbytes(v), ray.put(v)) for v in values[k * n : (k + 1) * n]]
            for k, item in enumerate(items)
        }

    def lookup(self, root, keys, tokens, longer_than: int) -> TierHit | None:
        found = self.index.lookup(root, keys, tokens, longer_than)
        if found is None:
            return None
        handle = {**found.checkpoint, "blocks": found.blocks}
        j = len(found.blocks)
        return TierHit(found.length, found.chain, found.tail, j, found.nbytes, handle)

    def stats(self) -> dict:
        return self.index.stats()


TierActor = ray.remote(PrefixTierStore)


def tier_actor(name: str, budget_bytes: int, block_size: int):
    """The named tier, started if it is not running. Outside any placement group: a Serve replica
    places what it starts in its own group, and removing that group (the replica stopping) would
    take the tier with it."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return TierActor.options(
        name=name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    ).remote(budget_bytes, block_size)


def tier_name(specs) -> str:
    """One tier per model and stage layout (its layers per stage, block size, dtype, weights)."""
    layout = [(s.model, s.start, s.end, s.block_size, s.dtype, s.quantization) for s in specs]
    return "jamba-ray-prefix-tier-" + hashlib.sha256(repr(layout).encode()).hexdigest()[:16]


class RayTierClient:
    """What an engine's `TierLink` calls: lookups and imports block (bounded by timeouts),
    publishing does not."""

    def __init__(self, config, pipeline):
        self.pipeline = pipeline  # the RayPipeline: its stages import, its exports are published
        self.name, self.budget = tier_name(pipeline.specs), config.state.prefix_tier_bytes
        self.block_size = config.state.block_size
        self.actor, self.retry_at = None, 0.0
        self._stats, self._stats_ref = {}, None
        if (actor := self._get()) is not None:  # (a new tier starts as the stages do)
            try:
                self._stats = ray.get(
                    actor.stats.remote(), timeout=config.placement.ready_timeout_s
                )
            except Exception as e:
                self._failed(e)

    def _get(self):
        if self.actor is None and time.monotonic() >= self.retry_at:
            try:
                self.actor = tier_actor(self.name, self.budget, self.block_size)
            except Exception as e:
                self._failed(e)
        return self.actor

    def _failed(self, e: BaseException) -> None:
        log.warning("prefix tier %s unavailable (%s); retrying in %.0fs", self.name, e, RETRY_S)
        self.actor, self.retry_at, self._stats_ref = None, time.monotonic() + RETRY_S, None

    def lookup(self, root, keys, tokens, local: int) -> TierHit | None:
        if (actor := self._get()) is None:
            return None
        try:
            return ray.get(call(actor.lookup, root, keys, tokens, local), timeout=LOOKUP_TIMEOUT_S)
        except Exception as e:
            self._failed(e)
            return None

    def fetch(self, hit: TierHit, ckpt: int, blocks: list[tuple[int, int]], tail) -> bool:
        h, ids = hit.handle, [b for b, _ in blocks] + ([tail] if tail is not None else [])
        calls = []
        for s, stage in enumerate(self.pipeline.stages):
            refs = [h["ckpt"][s]] + [h["blocks"][i][s] for _, i in blocks]
            refs += [h["tail"][s]] if tail is not None else []
            calls.append(call(stage.import_state, [ckpt], ids, *refs))
        try:
            ray.get(calls, timeout=FETCH_TIMEOUT_S)
            return True
        except Exception as e:  # (an object lost with the tier, a stage gone, a timeout)
            log.warning("prefix tier import failed, recomputing: %s", e)
            self._failed(e)  # (leave the tier alone a while: each admission would wait again)
            return False

    def landed_exports(self) -> list[list] | None:
        """Refs to what the step that just landed exported, per stage, per item (this driver's)."""
        exported = self.pipeline.landed_exports()
        return exported[1] if exported is not None else None

    def publish(self, exports, publication: Publication) -> None:
        if not publication or exports is None or (actor := self._get()) is None:
            return
        try:
            call(actor.publish, publication, exports)  # (fire and forget)
        except Exception as e:
            self._failed(e)

    def stats(self) -> dict:
        """The tier's latest numbers (refreshed in the background: never blocks)."""
        ref = self._stats_ref
        if ref is not None and ray.wait([ref], timeout=0)[0]:
            try:
                self._stats = ray.get(ref)
            except Exception as e:
                self._failed(e)
            ref = self._stats_ref = None
        if ref is None and (actor := self._get()) is not None:
            self._stats_ref = call(actor.stats)
        return self._stats
