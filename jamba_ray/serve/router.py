"""A Serve `RequestRouter` for engine replicas: each request goes where the longest prefix of its
token ids is really held (engine-reported), unless that replica is loaded beyond a threshold.

Each engine replica reports what it holds through Serve's `record_routing_stats` (an
`engine.prefix_report.PrefixReport` as a dict, every `stats_period_s`); the router reads the
request's token ids and `cache_salt` from the call's arguments, and ranks the replicas with
`engine.prefix_rank.rank` against their ongoing requests (Serve's own count, probed like its
power-of-two router does). What it routed since the last reports counts too (`Recent`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ..config.engine_config import RouterConfig
from ..engine.prefix_rank import Candidate, Recent, rank, report_source
from ..engine.prefix_report import PrefixReport, RequestKeys

TOKEN_ARGS = ("prompt_token_ids", "token_ids", "prompt_ids", "prompt")
CHOSEN_TTL_S = 2.0  # a first choice not sent by then was not taken


def request_tokens(args: Sequence, kwargs: dict) -> tuple[list[int], str | None] | None:
    """The token ids and cache salt of an engine call (`generate(token_ids, params, ...)`, by
    position or by name; the salt is `cache_salt` or a sampling params' `cache_salt`)."""
    ids = next((kwargs[k] for k in TOKEN_ARGS if _is_ids(kwargs.get(k))), None)
    if ids is None:
        ids = next((a for a in args if _is_ids(a)), None)
    if ids is None:
        return None
    salt = kwargs.get("cache_salt")
    for a in (*args, *kwargs.values()):
        salt = salt or getattr(a, "cache_salt", None)
    return list(ids), salt


def _is_ids(x: Any) -> bool:
    return isinstance(x, list | tuple) and bool(x) and all(type(t) is int for t in x[:8])


class PrefixRouter(RequestRouter):
    """Ranks replicas by reusable prefix within `imbalance_threshold` ongoing requests of the
    least loaded one; others (and requests without token ids) by load alone."""

    def initialize_state(
        self,
        imbalance_threshold: float = 8.0,
        recent_ttl_s: float = 5.0,
        block_size: int = 16,
        checkpoint_every: int = 256,
    ) -> None:
        self.threshold, self.block_size = imbalance_threshold, block_size
        self.checkpoint_every = checkpoint_every
        self.recent = Recent(recent_ttl_s)
        self._reports: dict[ReplicaID, tuple[Any, PrefixReport | None]] = {}
        self._keys: dict[int, RequestKeys] = {}  # id(pending request) -> its keys, until routed
        # replica -> when each request this router just ranked first there stops counting: it
        # is in no queue length until sent, and concurrent decisions must see it
        self._chosen: dict[ReplicaID, list[float]] = {}

    def _report(self, replica: RunningReplica) -> PrefixReport | None:
        stats = replica.routing_stats
        seen = self._reports.get(replica.replica_id)
        if seen is None or seen[0] is not stats:  # parse each new report once
            try:
                parsed = PrefixReport.from_dict(stats) if stats else None
            except (KeyError, TypeError, ValueError):  # not (yet) our report
                parsed = None
            self._reports[replica.replica_id] = seen = (stats, parsed)
        return seen[1]

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, float]:
        """Ongoing requests per replica: Serve's cached count, else a probe; replicas that do
        not answer are left out."""
        loads, missing = {}, []
        for r in replicas:
            cached = None
            if self._use_replica_queue_len_cache:
                cached = self._replica_queue_len_cache.get(r.replica_id)
            if cached is None:
                missing.append(r)
            else:
                loads[r.replica_id] = float(cached)
        if missing:
            for r, queue_len in await self._probe_queue_lens(missing, 0):
                if queue_len is not None:
                    loads[r.replica_id] = float(queue_len)
        return loads

    def _request_keys(self, pending: PendingRequest | None) -> RequestKeys | None:
        found = request_tokens(pending.args, pending.kwargs) if pending is not None else None
        if found is None:
            return None
        keys = RequestKeys(found[0], self.block_size, found[1])
        self._keys[id(pending)] = keys
        if len(self._keys) > 4096:  # cancelled before being routed: never popped
            self._keys.pop(next(iter(self._keys)))
        return keys

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:  # ranks below are every candidate: back off, then retry
            pending_request.routing_context.should_backoff = True
        loads = await self._loads(candidate_replicas)
        alive = [r for r in candidate_replicas if r.replica_id in loads] or candidate_replicas
        alive = random.sample(alive, len(alive))  # equal loads: no replica is always first
        req, now = self._request_keys(pending_request), time.time()
        by_id, cands = {}, []
        for r in alive:
            rid = r.replica_id.unique_id
            by_id[rid] = r
            report = self._report(r)
            sources = [report_source(report)] if report is not None else []
            load = loads.get(r.replica_id, report.load.ongoing if report else 0.0)
            load += len(self._pending(r.replica_id, now))
            cands.append(Candidate(rid, load, sources + self.recent.sources(rid, now)))
        order = [by_id[rid] for rid in rank(req, cands, self.threshold)]
        self._chosen.setdefault(order[0].replica_id, []).append(now + CHOSEN_TTL_S)
        return [[r] for r in order]

    def _pending(self, replica_id: ReplicaID, now: float) -> list[float]:
        live = [t for t in self._chosen.get(replica_id, ()) if t > now]
        self._chosen[replica_id] = live
        return live

    def on_send_request(self, replica_id: ReplicaID):
        super().on_send_request(replica_id)  # Serve's queue length counts it from now on
        if self._chosen.get(replica_id):
            self._chosen[replica_id].pop(0)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result):
        keys = self._keys.pop(id(pending_request), None)
        if keys is not None:
            every = self.checkpoint_every
            self.recent.note(replica_id.unique_id, keys, every, time.time())

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None):
        """Give the replica to the request it was chosen for. Serve's base router finds that
        request by `internal_request_id`, but a deployment's calls made inside one request share
        its id (Serve cancels them with it): of an ingress request's two engine calls (a Score of
        two texts, `n` > 1) only the first was ever routed. The call's own metadata object is
        unique, so match on it."""
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                if self._pending_requests_by_id.get(request_metadata.internal_request_id) is (
                    pending
                ):
                    self._remove_pending_request_from_indices(pending)
                return

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self.recent.forget(replica_id.unique_id)
        self._reports.pop(replica_id, None)


def request_router_config(router: RouterConfig, block_size: int, checkpoint_every: int):
    """Serve's `request_router_config` for the engine deployment: ours, or Serve's default
    (power of two choices) with the same stats period."""
    if router.policy == "default":
        return RequestRouterConfig(request_routing_stats_period_s=router.stats_period_s)
    kwargs = {
        "imbalance_threshold": router.imbalance_threshold,
        "recent_ttl_s": router.recent_ttl_s,
        "block_size": block_size,
        "checkpoint_every": checkpoint_every,
    }
    return RequestRouterConfig(
        request_router_class=PrefixRouter,
        request_router_kwargs=kwargs,
        request_routing_stats_period_s=router.stats_period_s,
    )
