"""The engine core: requests in, micro-batches through the pipeline, sampled tokens out.

`EngineCore` owns the scheduler, the pipeline and per-request output state; it never blocks.
Drivers (`LLM` for batch use, `AsyncEngine` for serving) loop: fill() -> wait for the oldest
micro-batch -> complete(). Several micro-batches are in flight, one per stage.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .capacity import derive_capacity
from .checkpoint import resolve
from .config import EngineConfig, ModelSpec
from .errors import CapacityError, InvalidRequestError
from .fit import fit_check, require_fit
from .metrics import EngineMetrics
from .model.device import select_device
from .outputs import CompletionOutput, RequestOutput, TextTracker
from .pipeline import Pipeline, Placement
from .planner import plan
from .sampler import RowInput, sample, top_logprobs
from .sampling import SamplingParams
from .scheduler import MicroBatch, Scheduler, SchedulerConfig
from .sequence import Segment, Sequence
from .tokenizer import encode_prompt, load_tokenizer
from .wire import unpack

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]


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
    pending: dict[int, CompletionOutput] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


def _samples_next(seg: Segment, seq: Sequence) -> bool:
    """After this segment the sequence has run every token it knows: its next one is sampled from
    the segment's last logit row. (A replay re-runs outputs too; only its last chunk samples.)"""
    return seg.num_logit_rows > 0 and seg.start + seg.length >= seq.length


def _row_input(seq: Sequence, compact: bool = False) -> RowInput:
    """What the sampler needs of a sequence; `compact` (sent to the last stage every step) leaves
    out the token lists unless penalties read them."""
    if compact and not seq.params.has_penalties:
        return RowInput(seq.params, seq.seed, seq.index, [], [], num_output=len(seq.output_ids))
    return RowInput(seq.params, seq.seed, seq.index, seq.prompt_ids, list(seq.output_ids))


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        ckpt = resolve(config.model)
        self.spec = ModelSpec.from_path(ckpt.root)
        slices = [tuple(s) for s in config.stage_slices] if config.stage_slices else None
        self.plans = plan(self.spec, config.num_stages, slices, config.dtype, config.balance)
        self.capacity = derive_capacity(self.spec, config, self.plans)
        select_device(config.num_gpus_per_stage, _cuda_visible(config), config.dtype)
        if config.device_memory_gib:
            require_fit(fit_check(self.spec, config, self.plans, config.device_memory_gib,
                                  config.activation_memory_gib))
        self.tokenizer = load_tokenizer(ckpt.root)
        placement = Placement(
            config.num_cpus_per_stage, config.num_gpus_per_stage, config.placement_strategy,
            config.stage_resources, in_current_group=config.in_current_placement_group,
        )
        model_ref = ckpt.repo_id or str(ckpt.root)
        self.pipeline = Pipeline(
            model_ref, self.plans, self.capacity.max_num_seqs, self.capacity.max_model_len,
            config.dtype, placement, config.threads_per_stage, config.quantization, config.transport,
            config.decode_graphs,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(self.capacity.max_num_seqs, len(self.plans), config.max_batched_tokens)
        )
        # The last stage samples where the logits are and sends tokens, not [rows, vocab] logits.
        self.sample_on_stage = config.sample_on == "last_stage"
        self.in_flight: deque[MicroBatch] = deque()
        self.requests: dict[str, RequestState] = {}
        self._next_seq = 0
        self.counters = {"generated_tokens": 0, "forks": 0, "finished_requests": 0, "stage_restarts": 0,
                         "reaped_slots": 0}
        self.metrics = EngineMetrics()

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, sink: Sink, task: str = "generate"
    ):
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        if params.n > self.capacity.max_num_seqs:
            raise InvalidRequestError(f"n={params.n} exceeds the {self.capacity.max_num_seqs} state slots")
        if self.scheduler.num_waiting >= self.config.max_waiting:
            raise CapacityError(f"{self.scheduler.num_waiting} requests already queued; retry later")
        ids = encode_prompt(self.tokenizer, prompt, self.spec.vocab_size)
        params = self._fit_max_tokens(params, len(ids))
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seqs = [self._new_seq(request_id, i, ids, params, seed) for i in range(params.n)]
        seqs[0].forks = seqs[1:]
        seqs[0].pooling = task == "classify"
        trackers = [TextTracker(self.tokenizer, params.stop, params.skip_special_tokens) for _ in seqs]
        state = RequestState(request_id, prompt if isinstance(prompt, str) else None, ids, params, seqs, trackers, sink)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self.requests[request_id] = state
        self.scheduler.add(seqs[0])
        return state

    def _fit_max_tokens(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        limit = self.capacity.max_model_len
        room = limit - prompt_len
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {prompt_len} tokens; this model's maximum context length is {limit}"
            )
        if params.max_tokens is None:
            return replace(params, max_tokens=room)
        if params.max_tokens > room:
            raise InvalidRequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds this model's "
                f"maximum context length of {limit} tokens"
            )
        return params

    def _new_seq(self, request_id, index, ids, params, seed) -> Sequence:
        self._next_seq += 1
        return Sequence(self._next_seq, request_id, index, ids, params, seed)

    def abort(self, request_id: str) -> None:
        """Cancel a request; slots not held by an in-flight micro-batch are released now."""
        state = self.requests.get(request_id)
        if state is None:
            return
        gone, freed = self.scheduler.abort(request_id)
        self.pipeline.release(freed)
        for s in gone:
            if not s.in_flight:
                self._finish_seq(state, s, "abort", release=False)
        self._emit(state)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight)

    # ---- steps ----------------------------------------------------------------------------
    def fill(self) -> int:
        """Submit micro-batches until one per stage is in flight; returns how many were added."""
        added = 0
        while len(self.in_flight) < self.pipeline.num_stages:
            mb = self.scheduler.schedule(in_flight=len(self.in_flight) + 1)
            if mb is None:
                break
            if self.sample_on_stage:
                mb.message = replace(mb.message, sample=self._rows_to_sample(mb), eos_id=self.spec.eos_token_id)
            mb.ref = self.pipeline.submit(mb.message, mb.token_ids)
            mb.submitted_at = time.monotonic()
            self.in_flight.append(mb)
            added += 1
        return added

    def _rows_to_sample(self, mb: MicroBatch) -> tuple:
        """(logit row, seq id, RowInput) for each sequence `complete` will sample from this step:
        those that have run every known token after it (`_samples_next`), and the forks that start then."""
        rows, row = [], 0
        for seg, seq in zip(mb.message.segments, mb.seqs):
            row += seg.num_logit_rows
            if _samples_next(seg, seq):
                rows += [(row - 1, s.seq_id, _row_input(s, compact=True)) for s in (*seq.forks, seq)]
        return tuple(rows)

    def complete(self, mb: MicroBatch, result) -> None:
        """Postprocess a landed micro-batch: prompt logprobs, forks, sampling, stops, outputs."""
        result = unpack(result)
        if not isinstance(result, dict):
            result = {"logits": result}
        logits, scores, samples = result["logits"], result.get("scores"), result.get("samples")
        to_sample: list[tuple[int, Sequence]] = []
        row = score_row = 0
        for seg, seq in zip(mb.message.segments, mb.seqs):
            nrows = seg.num_logit_rows
            rows, row = range(row, row + nrows), row + nrows
            seq.in_flight = False
            state = self.requests[seq.request_id]
            if seq.aborted:
                self._finish_seq(state, seq, "abort")
                continue
            seq.num_computed += seg.length
            if seg.logits == "all" and state.prompt_logprobs is not None and seq.index == 0:
                self._prompt_logprobs(state, seg.start, logits[rows.start : rows.stop])
            if seg.logits == "score":
                state.scores, score_row = scores[score_row].tolist(), score_row + 1
                self._finish_seq(state, seq, "stop")
                continue
            if not _samples_next(seg, seq):  # a prompt chunk, or a replay short of its known tokens
                continue
            for fork in self._start_forks(seq):
                to_sample.append((rows[-1], fork))
            to_sample.append((rows[-1], seq))
        if to_sample:
            self._sample(logits, to_sample, samples)
        for rid in {s.request_id for s in mb.seqs}:
            if rid in self.requests:
                self._emit(self.requests[rid])

    def _start_forks(self, seq: Sequence) -> list[Sequence]:
        if not seq.forks:
            return []
        forks = self.scheduler.start_forks(seq)
        self.pipeline.fork(seq.slot, [f.slot for f in forks], seq.num_computed)
        self.counters["forks"] += len(forks)
        return forks

    def _sample(self, logits: torch.Tensor | None, items: list[tuple[int, Sequence]], samples: dict | None) -> None:
        if samples is not None:  # the last stage sampled them
            outs = [samples[s.seq_id] for _, s in items]
        else:
            rows = [_row_input(s) for _, s in items]
            outs = sample(logits[[r for r, _ in items]], rows, self.spec.eos_token_id)
        for (_, seq), out in zip(items, outs):
            self._append(self.requests[seq.request_id], seq, out)

    def _append(self, state: RequestState, seq: Sequence, out) -> None:
        p: SamplingParams = seq.params
        seq.output_ids.append(out.token)
        self.counters["generated_tokens"] += 1
        state.first_token_at = state.first_token_at or time.monotonic()
        delta = state.pending.setdefault(seq.index, CompletionOutput(seq.index))
        delta.token_ids.append(out.token)
        seq.cumulative_logprob += out.logprob
        delta.cumulative_logprob = seq.cumulative_logprob
        if p.logprobs is not None:
            delta.logprobs = (delta.logprobs or []) + [{out.token: out.logprob, **(out.top or {})}]
        text, hit_stop = state.trackers[seq.index].push([out.token])
        delta.text += text
        reason = self._stop_reason(seq, out.token, hit_stop)
        if reason:
            delta.text += state.trackers[seq.index].flush(stopped=hit_stop)
            self._finish_seq(state, seq, reason)

    def _stop_reason(self, seq: Sequence, token: int, hit_stop: bool) -> str | None:
        p: SamplingParams = seq.params
        n = len(seq.output_ids)
        if hit_stop:
            return "stop"
        if n >= p.min_tokens:
            if token == self.spec.eos_token_id and not p.ignore_eos:
                return "stop"
            if token in p.stop_token_ids:
                return "stop"
        if n >= p.max_tokens or seq.length >= self.capacity.max_model_len:
            return "length"
        return None

    def _finish_seq(self, state: RequestState, seq: Sequence, reason: str, release: bool = True) -> None:
        forks = list(seq.forks)
        freed = self.scheduler.finish(seq, reason) if seq.slot is not None or forks else []
        if release:
            self.pipeline.release(freed)
        for s in [seq, *forks]:
            s.finish_reason = s.finish_reason or reason
            state.pending.setdefault(s.index, CompletionOutput(s.index)).finish_reason = s.finish_reason

    def _prompt_logprobs(self, state: RequestState, start: int, logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)  # [n, V]
        k = state.params.prompt_logprobs
        for j in range(logprobs.shape[0]):
            target = start + j + 1
            if target < len(state.prompt_ids):
                tok = state.prompt_ids[target]
                state.prompt_logprobs.append({tok: float(logprobs[j, tok]), **(top_logprobs(logprobs[j], k) or {})})

    def _emit(self, state: RequestState) -> None:
        if not state.pending and not state.finished:
            return
        outputs = [state.pending[i] for i in sorted(state.pending)]
        state.pending = {}
        finished = state.finished
        out = RequestOutput(
            state.request_id, state.prompt, state.prompt_ids, outputs, finished,
            state.prompt_logprobs if finished else None, scores=state.scores,
        )
        if finished:
            del self.requests[state.request_id]
            self.counters["finished_requests"] += 1
            self._observe(state)
        state.sink(out)

    def _observe(self, state: RequestState) -> None:
        if state.first_token_at is None:
            return
        now = time.monotonic()
        self.metrics.ttft.observe(state.first_token_at - state.arrival)
        n = max(len(s.output_ids) for s in state.seqs)
        if n > 1:
            self.metrics.tpot.observe((now - state.first_token_at) / (n - 1))

    # ---- introspection --------------------------------------------------------------------
    def stats_local(self) -> dict:
        """Engine-side numbers only (no stage round trip)."""
        return {
            "requests_running": len({s.request_id for s in self.scheduler.running}),
            "requests_waiting": self.scheduler.num_waiting,
            "slots_in_use": self.scheduler.slots.num_used,
            "slots_total": self.scheduler.slots.num_slots,
            "in_flight_micro_batches": len(self.in_flight),
            **self.counters,
        }

    def stats(self) -> dict:
        return {**self.stats_local(), "stages": self.pipeline.stats()}

    def shutdown(self) -> None:
        self.pipeline.shutdown()


def _cuda_visible(config: EngineConfig) -> bool:
    """GPU stages may sit on other nodes: trust the cluster's GPU count, not this process."""
    if not config.num_gpus_per_stage:
        return False
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= config.num_gpus_per_stage
