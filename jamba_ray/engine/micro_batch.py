"""A micro-batch: its message, its sequences, and what each segment asks of the stages. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import Segment, StepMessage
from .seq_state import SegmentState
from .sequence import Sequence
from .step_ops import StateOps


@dataclass(slots=True)
class MicroBatch:
    message: StepMessage
    seqs: list[Sequence]  # one per segment, same order
    token_ids: list[int]
    forked: list[Sequence] = field(default_factory=list)  # whose fork copy rides in this message
    ops: StateOps = StateOps()  # its state operations, and what the engine does once it lands
    handle: object = None  # the pipeline's pending result


def segment(seq: Sequence, n: int, st: SegmentState) -> Segment:
    """Which logit rows a segment needs, who samples from it, and the block-table entries
    and checkpoint the stages need for it: decided here, once."""
    start, end = seq.num_computed, seq.num_computed + n
    state = dict(blocks=st.blocks, table_start=st.table_start, restore=st.restore, emits=st.emits)
    if seq.pooling:
        logits = "score" if end >= len(seq.prompt_ids) else "none"
        return Segment(seq.seq_id, seq.slot, start, n, logits, **state)
    # Samples only where the sequence's known tokens end (a replay also re-runs its outputs).
    samples = tuple(q.seq_id for q in (*seq.forks, seq)) if end >= seq.length else ()
    # Prompt logprobs are the request's, collected once: from its first sample.
    wants_prompt = seq.in_prefill and wants_prompt_logprobs(seq)
    logits = "all" if wants_prompt else "last" if samples else "none"
    return Segment(seq.seq_id, seq.slot, start, n, logits, samples, **state)


def wants_prompt_logprobs(seq: Sequence) -> bool:
    return seq.index == 0 and getattr(seq.params, "prompt_logprobs", None) is not None
