"""`LLM`: the synchronous, vLLM-style facade over one pipeline."""

from __future__ import annotations

import itertools
from dataclasses import replace

import ray

from . import recovery
from .config import EngineConfig
from .engine import EngineCore
from .errors import InvalidRequestError
from .outputs import RequestOutput
from .sampling import SamplingParams


def ensure_ray(address: str | None = None) -> None:
    """Join the running Ray cluster, or start a local one."""
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)


class LLM:
    """`LLM(model=DIR_or_hub_id, num_stages=S).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str | None = None, num_stages: int = 1, **kwargs):
        if model is None:
            from .tiny import ensure_default_tiny

            model = str(ensure_default_tiny())
        self.config = EngineConfig(model=str(model), num_stages=num_stages, **kwargs)
        ensure_ray()
        self.engine = EngineCore(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        task: str = "generate",
    ) -> list[RequestOutput]:
        """One finished output per prompt, in prompt order; all prompts run concurrently."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts:
            raise InvalidRequestError("prompts must be a non-empty list of strings or token-id lists")
        params = sampling_params or SamplingParams()
        per = params if isinstance(params, list) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise InvalidRequestError("give one SamplingParams, or one per prompt")
        results: dict[str, RequestOutput] = {}
        order = []
        try:
            for prompt, p in zip(prompts, per):
                rid = f"llm-{next(self._ids)}"
                order.append(rid)
                self.engine.add_request(rid, prompt, p, lambda o: _collect(results, o), task)
            self._run()
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            self._drain()
            raise
        return [results[rid] for rid in order]

    def _run(self) -> None:
        eng = self.engine
        while eng.has_work():
            eng.fill()
            if not eng.in_flight:
                raise RuntimeError("engine has queued work but scheduled nothing")
            mb = eng.in_flight.popleft()
            try:
                logits = ray.get(mb.ref)
            except ray.exceptions.RayError:
                recovery.recover(eng)  # replaces dead stages and replays, or raises StageFailedError
                continue
            eng.complete(mb, logits)

    def _drain(self) -> None:
        """Land what is still in flight (aborted sequences free their slots as they land)."""
        try:
            self._run()
        except Exception:
            pass

    def score(self, texts: list[str] | list[list[int]]) -> list[dict]:
        """Total and per-token log-probability of each text (tokens after the first)."""
        outs = self.generate(texts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
        res = []
        for o in outs:
            lps = [next(iter(d.values())) for d in o.prompt_logprobs[1:]]
            res.append({"token_ids": o.prompt_token_ids, "token_logprobs": lps, "logprob": sum(lps)})
        return res

    def classify(self, texts: list[str] | list[list[int]]) -> list[list[float]]:
        """Classification-head logits per text (last-token pooling, as JambaForSequenceClassification)."""
        outs = self.generate(texts, SamplingParams(max_tokens=1), task="classify")
        return [o.scores for o in outs]

    def stats(self) -> list[dict]:
        """Per-stage `slots_in_use` / `slots_total` (and counters), read from the stage actors."""
        return self.engine.pipeline.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()


def _collect(results: dict[str, RequestOutput], out: RequestOutput) -> None:
    cur = results.get(out.request_id)
    if cur is None:
        results[out.request_id] = replace(out, delta=False)
        return
    by_index = {o.index: o for o in cur.outputs}
    for o in out.outputs:
        if o.index in by_index:
            by_index[o.index].merge(o)
        else:
            cur.outputs.append(o)
    cur.outputs.sort(key=lambda o: o.index)
    cur.finished = out.finished
    cur.scores = out.scores if out.scores is not None else cur.scores
    cur.prompt_logprobs = out.prompt_logprobs if out.finished else cur.prompt_logprobs
