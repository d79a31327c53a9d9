"""The small typed message that crosses stage boundaries beside the hidden states. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# "score": the last row through the sequence-classification head instead of lm_head.
LogitsMode = Literal["none", "last", "all", "score"]


@dataclass(frozen=True, slots=True)
class Segment:
    """`length` consecutive tokens of one sequence, at positions [start, start + length).

    `start == 0` means the slot's state is fresh (a new prefill); otherwise the slot already holds
    the state after `start` tokens. `logits` says which rows the last stage turns into logits.
    """

    seq_id: int
    slot: int
    start: int
    length: int
    logits: LogitsMode = "last"

    @property
    def is_decode(self) -> bool:
        return self.length == 1 and self.start > 0

    @property
    def num_logit_rows(self) -> int:
        """Rows of this segment in the last stage's logits."""
        return {"all": self.length, "last": 1}.get(self.logits, 0)


@dataclass(frozen=True, slots=True)
class StepMessage:
    """One micro-batch: its segments (tokens packed in this order) and slots to free first."""

    step_id: int
    segments: tuple[Segment, ...]
    free: tuple[int, ...] = ()
    in_flight: int = 1  # micro-batches in flight with this one: stages share cores between them
    # sample_on last_stage: (logit row, seq id, sampler.RowInput) for the rows the last stage samples
    sample: tuple = ()
    eos_id: int | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.segments)

    def logit_rows(self) -> list[int]:
        """Packed row indices whose logits the last stage returns, in segment order."""
        rows, offset = [], 0
        for s in self.segments:
            offset += s.length
            rows.extend(range(offset - s.num_logit_rows, offset))  # a segment's logit rows are its last
        return rows

    def score_rows(self) -> list[int]:
        """Packed rows pooled through the classification head (last token of the segment)."""
        rows, offset = [], 0
        for s in self.segments:
            offset += s.length
            if s.logits == "score":
                rows.append(offset - 1)
        return rows


class SequenceStatus:
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One sample of a request: its tokens, how many of them its slots have seen, and its status.

    `params` is the request's SamplingParams (kept untyped here so this module stays import-light).
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: object
    seed: int
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    num_computed: int = 0  # tokens whose state the slot holds
    status: str = SequenceStatus.WAITING
    in_flight: bool = False
    aborted: bool = False
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0
    pooling: bool = False  # classify: run the prompt, return the classification head's logits
    forks: list[Sequence] = field(default_factory=list)  # samples 1..n-1, waiting for this prefill

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def token(self, position: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[position] if position < p else self.output_ids[position - p]

    def pending(self) -> int:
        """Tokens not yet run through the pipeline (the prompt rest, or the last sampled token)."""
        return self.length - self.num_computed
