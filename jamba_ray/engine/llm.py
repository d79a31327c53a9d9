"""`LLM`: the synchronous, vLLM-style facade over one pipeline."""

from __future__ import annotations

import itertools
from dataclasses import replace

from ..config.engine_config import EngineConfig
from ..errors import InvalidRequestError
from .core import EngineCore
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """`LLM(model=DIR_or_hub_id, num_stages=S).generate(prompts, SamplingParams(...))`.

    Keyword options are the config tree's flat names (`max_num_seqs`, `dtype`, `backend`, ...);
    `config=EngineConfig(...)` gives the whole tree instead. Without a model: the tiny default.
    """

    def __init__(
        self,
        model: str | None = None,
        num_stages: int = 1,
        *,
        config: EngineConfig | None = None,
        **options,
    ):
        if config is None:
            if model is None:
                from ..tiny import ensure_default_tiny

                model = str(ensure_default_tiny())
            config = EngineConfig.build(str(model), num_stages=num_stages, **options)
        self.config = config
        self.engine = EngineCore(config)
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
        """One finished output per prompt, in prompt order; all prompts run concurrently, except
        that prompts sharing their first blocks wait for the first of them (prefix caching): a
        common instruction is then computed once, for generation and scoring alike."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts:
            raise InvalidRequestError(
                "prompts must be a non-empty list of strings or token-id lists"
            )
        params = sampling_params or SamplingParams()
        per = params if isinstance(params, list) else [params] * len(prompts)
        if len(per) != len(prompts):
            raise InvalidRequestError("give one SamplingParams, or one per prompt")
        results: dict[str, RequestOutput | BaseException] = {}
        order = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for wave in self._waves(prompts):
                for i in wave:
                    collect = _collector(results, order[i])
                    self.engine.add_request(order[i], prompts[i], per[i], collect, task)
                self._run()
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            self._run()  # land what is in flight: aborted sequences free their slots as they land
            raise
        errors = [results[rid] for rid in order if isinstance(results[rid], BaseException)]
        if errors:
            raise errors[0]
        return [results[rid] for rid in order]

    def _waves(self, prompts: list) -> list[list[int]]:
        """Prompt indices in two waves: the first prompt of each group sharing its first two KV
        blocks of tokens, then the rest (which resume from the first's checkpoints)."""
        if self.engine.kv.prefix is None:
            return [list(range(len(prompts)))]
        key_len, seen, first, rest = 2 * self.engine.kv.block_size, set(), [], []
        for i, p in enumerate(prompts):
            ids = self.tokenizer(p).input_ids if isinstance(p, str) else p
            key = tuple(ids[:key_len]) if len(ids) > key_len else None
            (rest if key is not None and key in seen else first).append(i)
            seen.add(key)
        return [first, rest] if rest else [first]

    def _run(self) -> None:
        eng = self.engine
        while eng.has_work():
            eng.step()
            if eng.scheduler.waiting and not eng.scheduler.running and not eng.in_flight:
                raise RuntimeError("engine has queued work but scheduled nothing")

    def score(self, texts: list[str] | list[list[int]]) -> list[dict]:
        """Total and per-token log-probability of each text (tokens after the first)."""
        outs = self.generate(
            texts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        )
        res = []
        for o in outs:
            lps = [next(iter(d.values())) for d in o.prompt_logprobs[1:]]
            res.append(
                {"token_ids": o.prompt_token_ids, "token_logprobs": lps, "logprob": sum(lps)}
            )
        return res

    def classify(self, texts: list[str] | list[list[int]]) -> list[list[float]]:
        """Classification-head logits per text (last-token pooling, as
        JambaForSequenceClassification)."""
        outs = self.generate(texts, SamplingParams(max_tokens=1), task="classify")
        return [o.scores for o in outs]

    def stats(self) -> dict:
        """Engine numbers (slots, counters) and per-stage counters under "stages"."""
        return {**self.engine.stats_local(), "stages": self.engine.pipeline.stats()}

    def shutdown(self) -> None:
        self.engine.shutdown()


def _collector(results: dict, request_id: str):
    def collect(out: RequestOutput | BaseException) -> None:
        cur = results.get(request_id)
        if isinstance(out, BaseException) or cur is None:
            results[request_id] = (
                out if isinstance(out, BaseException) else replace(out, delta=False)
            )
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

    return collect
