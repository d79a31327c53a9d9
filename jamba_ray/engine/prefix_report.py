"""What a replica holds and how full it is, for a prefix-aware router; and a request's side of the
match. Pure.

A replica reports the (truncated) chain keys of its cached full blocks, and each checkpoint as a
truncated `chain_key(its chain, its tail tokens)` with its length; a router recomputes the same
digests from a request's token ids (`block_keys`, `chain_key`: one definition of the hashing) and
so learns, without any token leaving the request, how long a prefix each replica can resume. A
truncated digest (8 bytes) that collides only misroutes a request: the engine's own match uses
the full keys. Reports are bounded: the `limit` most recently used blocks and checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .blocks import Key, block_keys, chain_key, root_key

DIGEST_BYTES = 8
REPORT_LIMIT = 4096  # blocks (and checkpoints) a report names at most


def digest(key: Key) -> bytes:
    return key[:DIGEST_BYTES]


@dataclass(frozen=True, slots=True)
class Load:
    """How full a replica's pipeline is (the numbers routing and autoscaling read)."""

    slots_in_use: int
    slots_total: int
    kv_blocks_in_use: int
    kv_blocks_total: int
    running_requests: int
    waiting_requests: int
    waiting_prefill_tokens: int  # prompt tokens admitted or queued and not computed yet

    @property
    def ongoing(self) -> int:
        return self.running_requests + self.waiting_requests


@dataclass(frozen=True, slots=True)
class PrefixReport:
    block_size: int
    checkpoint_every: int
    blocks: frozenset[bytes]  # digests of cached full blocks' chain keys
    checkpoints: tuple[tuple[bytes, int], ...]  # (digest of chain_key(chain, tail), length)
    load: Load
    prefix_hits: int = 0  # prompt tokens resumed from cache so far (observability)
    prefix_queries: int = 0  # prompt tokens looked up so far

    def to_dict(self) -> dict:
        """The wire form (Serve's routing stats are a dict)."""
        blob = b"".join(sorted(self.blocks))  # one bytes object: small to pickle and to hash
        return {**asdict(self), "blocks": blob, "load": asdict(self.load)}

    @classmethod
    def from_dict(cls, d: dict) -> PrefixReport:
        cps = tuple((bytes(k), int(n)) for k, n in d["checkpoints"])
        load = Load(**d["load"])
        blob, n = d["blocks"], DIGEST_BYTES
        blocks = frozenset(blob[i : i + n] for i in range(0, len(blob), n))
        return cls(**{**d, "blocks": blocks, "checkpoints": cps, "load": load})


def pending_prefill(scheduler) -> int:
    """Prompt tokens not computed yet, of the waiting and the running sequences."""
    seqs = [*scheduler.waiting, *scheduler.running]
    return sum(max(0, len(s.prompt_ids) - s.num_computed) for s in seqs)


def build_report(kv, scheduler, limit: int = REPORT_LIMIT) -> PrefixReport:
    """The report of one engine (its `KVCache` and `Scheduler`), at most `limit` keys each."""
    blocks, prefix = kv.blocks, kv.prefix
    cps = prefix.checkpoints()[::-1][:limit] if prefix is not None else []  # newest first
    load = Load(
        slots_in_use=scheduler.slots.num_used,
        slots_total=scheduler.slots.num_slots,
        kv_blocks_in_use=blocks.num_used,
        kv_blocks_total=blocks.num_blocks,
        running_requests=len({s.request_id for s in scheduler.running}),
        waiting_requests=scheduler.num_waiting,
        waiting_prefill_tokens=pending_prefill(scheduler),
    )
    return PrefixReport(
        block_size=kv.block_size,
        checkpoint_every=kv.checkpoint_every,
        blocks=frozenset(digest(k) for k in blocks.recent_keys(limit)),
        checkpoints=tuple((digest(chain_key(cp.chain, cp.tail)), cp.length) for cp in cps),
        load=load,
        prefix_hits=prefix.hits if prefix is not None else 0,
        prefix_queries=prefix.queries if prefix is not None else 0,
    )


class RequestKeys:
    """A request's side: the digests of its full blocks, and of a checkpoint at any length.

    Like the engine's match, only the first len(tokens) - 1 tokens can be resumed (the last one
    must run to give the first sample's logits)."""

    def __init__(self, token_ids: list[int], block_size: int, cache_salt: str | None = None):
        self.tokens, self.block_size = list(token_ids), block_size
        self.root = root_key(cache_salt)
        self.keys = block_keys(self.tokens, block_size, root=self.root)  # every full block
        self.digests = [digest(k) for k in self.keys]
        self._at: dict[int, bytes] = {}

    @property
    def resumable(self) -> int:
        return max(0, len(self.tokens) - 1)

    def checkpoint_digest(self, length: int) -> bytes:
        """The digest a checkpoint of this request's first `length` tokens is reported under."""
        if length not in self._at:
            full = length // self.block_size
            parent = self.keys[full - 1] if full else self.root
            tail = self.tokens[full * self.block_size : length]
            self._at[length] = digest(chain_key(parent, tail))
        return self._at[length]
