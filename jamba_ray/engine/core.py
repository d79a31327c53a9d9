"""The engine core: requests in, micro-batches through the pipeline, tokens out.

One step is `schedule() -> run -> postprocess()`: submit micro-batches until one per stage is in
flight, wait for the oldest, and fold its `StepResult` into the requests. `step()` blocks (the
`LLM` facade and the batch scorer); `step_async()` awaits (`AsyncEngine`). Nothing else differs.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from ..config.capacity import derive_capacity
from ..config.engine_config import EngineConfig
from ..config.fit import fit_check, require_fit
from ..config.model_path import resolve
from ..config.planner import plan
from ..config.spec import ModelSpec
from ..errors import CapacityError, InvalidRequestError, StageFailedError
from .kv_cache import KVCache
from .messages import Segment, StepFailure, StepResult
from .micro_batch import MicroBatch
from .output_processor import OutputProcessor, Sink
from .pipeline_api import Pipeline, backend
from .recovery import Recovery, RecoveryPlan, Replaced
from .recovery import trusted as recovery_trusted
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .tier_link import attach_tier
from .tokenizer import encode_prompt, load_tokenizer

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, make_pipeline: Callable[..., Pipeline] | None = None):
        self.config = config
        ckpt = resolve(config.model.path)
        self.spec = ModelSpec.from_path(ckpt.root)
        place = config.placement
        slices = [tuple(s) for s in place.stage_slices] if place.stage_slices else None
        self.plans = plan(self.spec, place.num_stages, slices, config.model.dtype, place.balance)
        measured = bool(config.state.gpu_memory_utilization and place.num_gpus_per_stage)
        if not measured:  # a stated budget: refuse what cannot fit before any stage starts
            self.capacity = derive_capacity(self.spec, config, self.plans)
        if place.device_memory_gib:
            require_fit(fit_check(self.spec, config, self.plans))
        self.has_classifier = "score.weight" in ckpt.weight_map()
        self.tokenizer = load_tokenizer(ckpt.root)
        make_pipeline = make_pipeline or backend(place.backend)
        self.pipeline = make_pipeline(
            config, ckpt.repo_id or str(ckpt.root), self.plans, self.spec.eos_token_id
        )
        if measured:
            budget = self.pipeline.measure(
                config.state.gpu_memory_utilization, config.batched_tokens
            )
            self.capacity = derive_capacity(self.spec, config, self.plans, budget)
        self.pipeline.allocate(self.capacity)
        cap, st = self.capacity, config.state
        self.kv = KVCache(
            cap.num_blocks,
            cap.block_size,
            cap.num_checkpoints,
            st.checkpoint_every,
            snapshots=self.pipeline.snapshots,  # (the pipeline reads `recovery_snapshots`)
        )
        self.scheduler = Scheduler(
            config.scheduler.on(config.device), cap.max_num_seqs, self.kv, len(self.plans)
        )
        self.outputs = OutputProcessor(self.tokenizer, self.spec.eos_token_id, cap.max_model_len)
        self.recovery = Recovery(config.recovery.max_stage_restarts)
        self.in_flight, self._next_seq = deque[MicroBatch](), 0
        self.counters = {"forks": 0, "stage_restarts": 0, "isolated_failures": 0}
        attach_tier(self)  # `kv.tier` with state.prefix_tier

    # ---- requests ----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        sink: Sink,
        task: str = "generate",
    ) -> None:
        """Validate (raising InvalidRequestError / CapacityError) and queue a request."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        if request_id in self.outputs.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        if params.n > self.capacity.max_num_seqs:
            raise InvalidRequestError(
                f"n={params.n} exceeds the {self.capacity.max_num_seqs} state slots"
            )
        if task == "classify" and not self.has_classifier:
            raise InvalidRequestError("this checkpoint has no classification head (score.weight)")
        ids = encode_prompt(self.tokenizer, prompt, self.spec.vocab_size)
        params = self._fit_max_tokens(params, len(ids))
        if self.scheduler.num_waiting >= self.config.scheduler.max_waiting:
            raise CapacityError(
                f"{self.scheduler.num_waiting} requests already queued; retry later"
            )
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        base, self._next_seq = self._next_seq + 1, self._next_seq + params.n
        forks = [Sequence(base + i, request_id, i, ids, params, seed) for i in range(1, params.n)]
        first = Sequence(
            base, request_id, 0, ids, params, seed, forks=forks, pooling=task == "classify"
        )
        seqs = [first, *forks]
        self.outputs.add(request_id, prompt, ids, params, seqs, sink)
        self.scheduler.add(seqs[0])

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
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds this "
                "model's "
                f"maximum context length of {limit} tokens"
            )
        return params

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slots not held by an in-flight micro-batch are free at once."""
        state = self.outputs.requests.get(request_id)
        if state is None:
            return
        self.scheduler.abort(request_id)
        for seq in state.seqs:
            if seq.finished:
                self.outputs.finished(seq)
        self.outputs.emit(request_id)

    def fail_request(self, request_id: str, error: BaseException) -> None:
        """End one request with `error`; the others carry on."""
        if request_id in self.outputs.requests:
            self.outputs.fail(request_id, error)
            self.scheduler.abort(request_id)  # those in flight end when they land

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight) or self.recovery.pending

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> None:
        """One step for a blocking driver."""
        mb = self.schedule()
        if mb is not None:
            self.postprocess(mb, self.pipeline.wait(mb.handle))
        elif self.recovery.pending:
            self.recover(self._replace_dead())

    async def step_async(self) -> None:
        """One step for an asyncio driver (stage replacement runs in a thread: it blocks)."""
        mb = self.schedule()
        if mb is not None:
            self.postprocess(mb, await self.pipeline.wait_async(mb.handle))
        elif self.recovery.pending:
            self.recover(await asyncio.to_thread(self._replace_dead))

    def schedule(self) -> MicroBatch | None:
        """Submit micro-batches until one per stage is in flight; returns the oldest one.
        After a failure nothing new goes out until every micro-batch in flight has landed."""
        while not self.recovery.pending and len(self.in_flight) < self.pipeline.num_stages:
            mb = self.scheduler.schedule(in_flight=len(self.in_flight) + 1)
            self._restart_preempted()
            if mb is None:
                break
            mb.handle = self.pipeline.submit(mb.message, mb.token_ids)
            self.in_flight.append(mb)
        return self.in_flight.popleft() if self.in_flight else None

    def _restart_preempted(self) -> None:
        """A preempted first sample recomputes its prompt, and with it its prompt logprobs."""
        for seq in self.scheduler.preempted:
            if seq.index == 0:
                self.outputs.restart_prompt_logprobs(seq.request_id)
        self.scheduler.preempted = []

    def postprocess(self, mb: MicroBatch, result: StepResult | StepFailure) -> None:
        """Fold a landed micro-batch into its sequences and requests."""
        if isinstance(result, StepFailure):
            for seq in mb.seqs:
                seq.in_flight = False
            self.scheduler.requeue(mb)
            self.recovery.failed(mb, result)
            return
        self.kv.drop_superseded(mb.ops.superseded)
        landed: list = []  # checkpoints the segments emitted
        for seg, seq in zip(mb.message.segments, mb.seqs):
            try:
                self._land(seg, seq, result, landed)
            except Exception as e:  # a bug in one request's postprocessing ends only that request
                log.exception("postprocessing request %s failed", seq.request_id)
                self.fail_request(
                    seq.request_id,
                    StageFailedError(f"postprocessing a step failed: {type(e).__name__}: {e}"),
                )
        self._keep_prompt_logprobs(mb, landed)
        for rid in dict.fromkeys(s.request_id for s in mb.seqs):
            self.outputs.emit(rid)

    def _keep_prompt_logprobs(self, mb: MicroBatch, landed: list) -> None:
        """Checkpoints this message saved or emitted keep the prompt logprobs they cover, so that
        a scoring request resuming from one has them all."""
        for saved in (*mb.ops.saved, *landed):
            state = self.outputs.requests.get(saved.request_id)
            entries = state.prompt_logprobs if state is not None and saved.index == 0 else None
            if entries is not None and len(entries) > saved.length:
                k, nxt = state.params.prompt_logprobs, state.prompt_ids[saved.length]
                self.kv.keep_logprobs(saved, k, entries, nxt)

    def _land(self, seg: Segment, seq: Sequence, result: StepResult, landed: list) -> None:
        landed += self.scheduler.landed(seq, seg)
        if seq.aborted:
            if seq.slot is not None:
                self.finish_seq(seq)
            return
        if seg.logits == "all":  # (none come back when the prefix cache had every position's)
            first, entries = result.prompt_logprobs.get(seq.seq_id, (seg.start + 1, []))
            self.outputs.prompt_logprobs(seq, first, entries)
        if seg.logits == "score":
            self.outputs.scores(seq, result.scores[seq.seq_id])
            self.finish_seq(seq, "stop")
            return
        if not seg.samples:  # a prompt chunk, or a replay short of its known tokens
            return
        forks = self.scheduler.start_forks(seq)
        self.counters["forks"] += len(forks)
        for s in (*forks, seq):
            self._sampled(s, result)

    def _sampled(self, seq: Sequence, result: StepResult) -> None:
        out = result.samples[seq.seq_id]
        self.scheduler.append(seq, out.token)
        reason = self.outputs.token(seq, out)
        if reason:
            self.finish_seq(seq, reason)

    def finish_seq(self, seq: Sequence, reason: str = "abort") -> None:
        forks = list(seq.forks)
        self.scheduler.finish(seq, reason)
        for s in (seq, *forks):
            self.outputs.finished(s)

    # ---- recovery ----------------------------------------------------------------------------
    def _replace_dead(self) -> Replaced | StageFailedError:
        """Blocking: replace dead stages, importing what the engine still trusts."""
        kv = self.kv
        trusted = recovery_trusted(kv, self.recovery.messages()) if kv.snapshots else None
        return self.recovery.replace_dead(self.pipeline, trusted)

    def recover(self, outcome: Replaced | StageFailedError) -> None:
        """Apply recovery's plan once nothing is in flight."""
        self.apply(self.recovery.plan(outcome, list(self.scheduler.running)))
        for seq in list(self.scheduler.running):  # aborted while its micro-batch was failing
            if seq.aborted:
                self.finish_seq(seq)

    def apply(self, plan: RecoveryPlan) -> None:
        self.counters["stage_restarts"] += plan.stage_restarts
        self.counters["isolated_failures"] += plan.isolated_failures
        if plan.fail_all is not None:
            plan.fail += [(rid, plan.fail_all) for rid in self.outputs.requests]
        for rid, error in plan.fail:
            self.fail_request(rid, error)
        replayed = self.scheduler.recover(plan)
        for s in replayed:  # prompt logprobs come from the first sample's prefill: it runs again
            if s.index == 0:
                self.outputs.restart_prompt_logprobs(s.request_id)

    # ---- introspection -----------------------------------------------------------------------
    def stats_local(self) -> dict:
        """Engine-side numbers only (no stage round trip)."""
        slots = self.scheduler.slots
        return {
            "requests_running": len({s.request_id for s in self.scheduler.running}),
            "requests_waiting": self.scheduler.num_waiting,
            "slots_in_use": slots.num_used,
            "slots_total": slots.num_slots,
            **self.kv.stats(),
            "preemptions": self.scheduler.num_preemptions,
            "in_flight_micro_batches": len(self.in_flight),
            **self.outputs.counters,
            **self.counters,
        }

    def shutdown(self) -> None:
        self.pipeline.shutdown()
