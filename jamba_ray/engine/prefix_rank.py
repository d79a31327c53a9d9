"""Which replica a request should go to: the longest prefix it can resume there, against load.
Pure.

What a replica can resume is decided as the engine decides it (`PrefixCache.match`): the longest
checkpoint whose tokens begin the request, leave at least one token to run, and whose full
blocks are all cached; the Mamba state exists only at a checkpoint, so cached blocks past the
last usable checkpoint count for nothing. The router sees this through reports (`prefix_report`)
and through what it routed itself since (`Recent`). Approximations: a report is a snapshot up to
one stats period old and names only the most recently used blocks and checkpoints; a routed
request is assumed to leave its full blocks and the checkpoints its prefill emits (every
`checkpoint_every` tokens of its prompt, after all but its last token and at its end) until its
entry expires.

Ranking: among the replicas whose load (ongoing requests) is within `threshold` of the least
loaded one, the longest reusable prefix wins (ties: the lower load); when none of them can reuse
anything, or the prompt is shorter than one block, the least loaded wins.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .checkpointing import emit_positions
from .prefix_report import PrefixReport, RequestKeys

# What one source says a replica holds: block digests and (checkpoint digest, length) pairs.
Held = tuple[Collection[bytes], Iterable[tuple[bytes, int]]]


def reusable(req: RequestKeys, sources: list[Held]) -> int:
    """Prompt tokens the replica holding `sources` can resume `req` from (0: none)."""
    held = 0
    for d in req.digests[: req.resumable // req.block_size]:
        if not any(d in blocks for blocks, _ in sources):
            break
        held += 1
    best = 0
    for _, checkpoints in sources:
        for d, length in checkpoints:
            if best < length <= req.resumable and length // req.block_size <= held:
                if req.checkpoint_digest(length) == d:
                    best = length
    return best


def report_source(report: PrefixReport) -> Held:
    return report.blocks, report.checkpoints


@dataclass(frozen=True, slots=True)
class Candidate:
    replica: str
    load: float  # ongoing requests (Serve's own count where it has one)
    sources: list[Held] = field(default_factory=list)


def rank(req: RequestKeys | None, candidates: list[Candidate], threshold: float) -> list[str]:
    """Replica ids, most preferred first (the rest by load)."""
    by_load = sorted(candidates, key=lambda c: c.load)
    if not candidates or req is None or req.resumable < req.block_size:
        return [c.replica for c in by_load]
    least = by_load[0].load
    scored = [(reusable(req, c.sources), c) for c in candidates if c.load - least <= threshold]
    best = max(scored, key=lambda t: (t[0], -t[1].load))
    if best[0] == 0:
        return [c.replica for c in by_load]
    return [best[1].replica] + [c.replica for c in by_load if c is not best[1]]


class Recent:
    """Requests routed in the last `ttl_s`, per replica: what that replica will hold once they
    ran, until its own reports (one stats period behind) say so. Bursts sharing a prefix stay
    together instead of scattering before any report names it."""

    MAX_PER_REPLICA = 256

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._by: dict[str, deque[tuple[float, frozenset[bytes], tuple]]] = {}

    def note(self, replica: str, req: RequestKeys, checkpoint_every: int, now: float) -> None:
        if self.ttl_s <= 0 or req.resumable < req.block_size:
            return
        n = len(req.tokens)
        lengths = emit_positions(0, n, n, checkpoint_every, 0)  # as its prefill will emit
        cps = tuple((req.checkpoint_digest(m), m) for m in lengths)
        entries = self._by.setdefault(replica, deque(maxlen=self.MAX_PER_REPLICA))
        entries.append((now + self.ttl_s, frozenset(req.digests), cps))

    def sources(self, replica: str, now: float) -> list[Held]:
        entries = self._by.get(replica)
        if not entries:
            return []
        while entries and entries[0][0] <= now:
            entries.popleft()
        return [(blocks, cps) for _, blocks, cps in entries]

    def forget(self, replica: str) -> None:
        self._by.pop(replica, None)
