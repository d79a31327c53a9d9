"""The typed contract across the stage boundary: `StepMessage` down, `StepResult` back. Pure Python.

Hidden states travel beside the message (object store or p2p); nothing else does. Every stage
reads the segments and the state operations (forks); only the last stage reads the sampling part
(`admitted`, `finished`, each segment's `samples`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# "score": the last row through the sequence-classification head instead of lm_head.
LogitsMode = Literal["none", "last", "all", "score"]


@dataclass(frozen=True, slots=True)
class Segment:
    """`length` consecutive tokens of one sequence, at positions [start, start + length).

    `start == 0` means the slot's state is fresh (a new prefill); otherwise the slot already holds
    the state after `start` tokens. `logits` says which rows the last stage turns into logits, and
    `samples` which sequences draw their next token from the segment's last row (the sequence
    itself, and its forks when a prompt with n > 1 finishes). Stages keep each sequence's KV block
    table; a segment carries only the entries they do not have yet.
    """

    seq_id: int
    slot: int
    start: int
    length: int
    logits: LogitsMode = "last"
    samples: tuple[int, ...] = ()
    blocks: tuple[int, ...] = ()  # KV block table entries from `table_start` on (a delta)
    table_start: int = 0  # 0: `blocks` is the whole table (a new, resumed or replayed sequence)
    restore: int | None = None  # checkpoint restored into the slot first (a prefix-cache hit)
    # (p, checkpoint): the Mamba state after p tokens (start < p <= end) is written into that
    # checkpoint while the segment runs (prefix-cache checkpoints inside a prefill chunk)
    emits: tuple[tuple[int, int], ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def is_decode(self) -> bool:
        return self.length == 1 and self.start > 0

    @property
    def num_logit_rows(self) -> int:
        """Rows of this segment in the last stage's logits (always its last rows)."""
        return {"all": self.length, "last": 1}.get(self.logits, 0)


@dataclass(frozen=True, slots=True)
class Fork:
    """Copy the Mamba state of slot `src` into each slot of `dsts` (n > 1; KV blocks are shared)."""

    src: int
    dsts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SeqInfo:
    """What the last stage keeps of a sequence to sample it: sent once, when it is admitted (and
    again after a replay). `params` is a SamplingParams, untyped here to keep this module light."""

    seq_id: int
    params: object
    seed: int
    index: int  # which of the request's n samples
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class StepMessage:
    """One micro-batch: tokens are packed in segment order. The state operations apply first, in
    this order: forgotten sequences, block copies, forks, checkpoint saves, exports; then the
    segments (each writing the checkpoints it `emits` as it runs). An export hands copies of
    the named checkpoints and full KV blocks to the driver (recovery snapshots: a replacement
    stage imports them)."""

    step_id: int
    segments: tuple[Segment, ...]
    forks: tuple[Fork, ...] = ()
    copies: tuple[tuple[int, int], ...] = ()  # KV blocks (src, dst): copy-on-write tails
    saves: tuple[tuple[int, int], ...] = ()  # (slot, checkpoint): Mamba state kept for reuse
    export_ckpts: tuple[int, ...] = ()  # checkpoints exported (after this message's saves)
    export_blocks: tuple[int, ...] = ()  # full KV blocks exported (filled by earlier messages)
    admitted: tuple[SeqInfo, ...] = ()
    finished: tuple[int, ...] = ()  # sequence ids the stages forget (block tables, sampling state)
    in_flight: int = 1  # micro-batches in flight with this one: stages share cores between them
    return_logits: bool = False  # raw [rows, vocab] logits back too (parity checks, benchmarks)

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def num_exports(self) -> int:
        return len(self.export_ckpts) + len(self.export_blocks)

    def logit_rows(self) -> list[int]:
        """Packed row indices whose logits the last stage computes, in segment order."""
        rows, offset = [], 0
        for s in self.segments:
            offset += s.length
            rows.extend(range(offset - s.num_logit_rows, offset))
        return rows

    def score_rows(self) -> list[int]:
        """Packed rows pooled through the classification head (last token of the segment)."""
        rows, offset = [], 0
        for s in self.segments:
            offset += s.length
            if s.logits == "score":
                rows.append(offset - 1)
        return rows


@dataclass(frozen=True, slots=True)
class SampledToken:
    token: int
    logprob: float
    top: dict[int, float] | None = None  # top-k logprobs when requested


@dataclass(frozen=True, slots=True)
class StepResult:
    """What the last stage sends back for one micro-batch: no logits, only what was asked for."""

    step_id: int
    samples: dict[int, SampledToken] = field(default_factory=dict)  # seq id -> its next token
    # seq id -> logprob entries of prompt positions [first, first + len) (position 0 has none)
    prompt_logprobs: dict[int, tuple[int, list[dict[int, float]]]] = field(default_factory=dict)
    scores: dict[int, list[float]] = field(default_factory=dict)  # classification-head logits
    logits: object = None  # fp32 numpy [rows, vocab] when the message asked for them


@dataclass(frozen=True, slots=True)
class StepFailure:
    """A micro-batch that did not come back: a stage died, or failed to compute it."""

    error: str
