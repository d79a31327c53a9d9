"""Per-request outputs: detokenizing, stop strings and tokens, deltas to each sink, metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .messages import SampledToken
from .metrics import EngineMetrics
from .outputs import CompletionOutput, RequestOutput, TextTracker
from .sampling_params import SamplingParams
from .sequence import Sequence

Sink = Callable[[RequestOutput | BaseException], None]


@dataclass(slots=True, eq=False)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    trackers: list[TextTracker]
    sink: Sink
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prompt_logprobs: list | None = None
    scores: list[float] | None = None
    pending: dict[int, CompletionOutput] = field(default_factory=dict)  # deltas not yet emitted
    cumulative: dict[int, float] = field(default_factory=dict)  # logprob of each sample so far

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def delta(self, index: int) -> CompletionOutput:
        return self.pending.setdefault(index, CompletionOutput(index))


class OutputProcessor:
    def __init__(self, tokenizer, eos_id: int | None, max_model_len: int):
        self.tokenizer, self.eos_id, self.max_model_len = tokenizer, eos_id, max_model_len
        self.requests: dict[str, RequestState] = {}
        self.metrics = EngineMetrics()
        self.counters = {"generated_tokens": 0, "finished_requests": 0}

    def add(
        self,
        request_id: str,
        prompt,
        prompt_ids: list[int],
        params: SamplingParams,
        seqs: list[Sequence],
        sink: Sink,
    ) -> RequestState:
        trackers = [
            TextTracker(self.tokenizer, params.stop, params.skip_special_tokens) for _ in seqs
        ]
        state = RequestState(
            request_id,
            prompt if isinstance(prompt, str) else None,
            prompt_ids,
            params,
            seqs,
            trackers,
            sink,
        )
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self.requests[request_id] = state
        return state

    def token(self, seq: Sequence, out: SampledToken) -> str | None:
        """Record a sampled token (already appended to `seq`); returns why it ends, if it does."""
        state = self.requests[seq.request_id]
        self.counters["generated_tokens"] += 1
        state.first_token_at = state.first_token_at or time.monotonic()
        delta = state.delta(seq.index)
        delta.token_ids.append(out.token)
        state.cumulative[seq.index] = state.cumulative.get(seq.index, 0.0) + out.logprob
        delta.cumulative_logprob = state.cumulative[seq.index]
        if seq.params.logprobs is not None:
            delta.logprobs = (delta.logprobs or []) + [{out.token: out.logprob, **(out.top or {})}]
        text, hit_stop = state.trackers[seq.index].push([out.token])
        delta.text += text
        reason = self._stop_reason(seq, out.token, hit_stop)
        if reason:
            delta.text += state.trackers[seq.index].flush(stopped=hit_stop)
        return reason

    def _stop_reason(self, seq: Sequence, token: int, hit_stop: bool) -> str | None:
        p: SamplingParams = seq.params
        n = len(seq.output_ids)
        if hit_stop:
            return "stop"
        if n >= p.min_tokens and (
            (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids
        ):
            return "stop"
        if n >= p.max_tokens or seq.length >= self.max_model_len:
            return "length"
        return None

    def finished(self, seq: Sequence) -> None:
        state = self.requests.get(seq.request_id)
        if state is not None:
            state.delta(seq.index).finish_reason = seq.finish_reason

    def prompt_logprobs(self, seq: Sequence, first: int, entries: list) -> None:
        state = self.requests[seq.request_id]
        cached = seq.cached_logprobs  # a prefix-cache hit: the positions it skipped
        if state.prompt_logprobs == [None] and cached is not None and len(cached) == first:
            state.prompt_logprobs = list(cached)
        if state.prompt_logprobs is not None and len(state.prompt_logprobs) == first:
            state.prompt_logprobs += entries

    def restart_prompt_logprobs(self, request_id: str) -> None:
        """A replay recomputes them from the first position."""
        state = self.requests.get(request_id)
        if state is not None and state.prompt_logprobs is not None:
            state.prompt_logprobs = [None]

    def scores(self, seq: Sequence, scores: list[float]) -> None:
        self.requests[seq.request_id].scores = scores

    def emit(self, request_id: str) -> None:
        """Send what is new to the request's sink; a finished request leaves the table."""
        state = self.requests.get(request_id)
        if state is None or (not state.pending and not state.finished):
            return
        outputs = [state.pending[i] for i in sorted(state.pending)]
        state.pending = {}
        finished = state.finished
        out = RequestOutput(
            state.request_id,
            state.prompt,
            state.prompt_ids,
            outputs,
            finished,
            state.prompt_logprobs if finished else None,
            scores=state.scores,
            num_cached_tokens=state.seqs[0].num_cached,
        )
        if finished:
            del self.requests[request_id]
            self.counters["finished_requests"] += 1
            self.metrics.observe(
                state.arrival, state.first_token_at, max(len(s.output_ids) for s in state.seqs)
            )
        state.sink(out)

    def fail(self, request_id: str, error: BaseException) -> None:
        """The request ends with `error` (its sequences are finished by the caller)."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            state.sink(error)
