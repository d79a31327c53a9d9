"""One sample of a request and where it stands. Only the scheduler mutates it. Pure Python.

Its paged state (block table, block keys, restore, snapshot) is the KV cache's, keyed by `seq_id`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import SeqInfo


@dataclass(slots=True, eq=False)
class Sequence:
    """Tokens of one sample, how many of them its state slot has seen, and why it ended.

    `params` is the request's SamplingParams (kept untyped here so this module stays import-light).
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: object
    seed: int
    output_ids: list[int] = field(default_factory=list)
    forks: list[Sequence] = field(default_factory=list)  # samples 1..n-1, waiting for this prefill
    pooling: bool = False  # classify: run the prompt, return the classification head's logits
    slot: int | None = None
    num_computed: int = 0  # tokens whose state the slot holds
    num_cached: int = 0  # prompt tokens resumed from the prefix cache
    cached_logprobs: list | None = None  # prompt-logprob entries of the prefix it resumed from
    in_flight: bool = False
    aborted: bool = False
    finish_reason: str | None = None
    registered: bool = False  # the last stage holds its SeqInfo (sent again after a replay)
    suspect: bool = False  # was in a micro-batch that failed to compute: runs alone until it lands

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def token(self, position: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[position] if position < p else self.output_ids[position - p]

    def pending(self) -> int:
        """Tokens not yet run through the pipeline (the prompt rest, or the last sampled token)."""
        return self.length - self.num_computed

    def info(self) -> SeqInfo:
        return SeqInfo(
            self.seq_id,
            self.params,
            self.seed,
            self.index,
            tuple(self.prompt_ids),
            tuple(self.output_ids),
        )
