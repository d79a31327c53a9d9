"""The Ray Data actor: one pipeline (engine + stage actors) scoring batches of rows."""

from __future__ import annotations

import math

import pandas as pd

from ..engine.sampling_params import SamplingParams
from ..errors import JambaRayError
from .score_config import ScoreConfig

OUTPUT_COLUMNS = {
    "loglik": ["logprob", "num_tokens", "perplexity", "error"],
    "classify": ["label", "probs", "logits", "num_tokens", "error"],
    "generate": ["completion", "finish_reason", "num_tokens", "error"],
}

INT_COLUMNS = ("label", "num_tokens")  # nullable integers: an error row has neither


def text_error(text, column: str) -> str | None:
    """Why a row's text cannot be scored, or None."""
    if not isinstance(text, str):
        if text is None or pd.isna(text) is True:  # None, NaN or pd.NA, as the reader gave it
            return f"{column} is missing (null)"
        return f"{column} must be a string, got {type(text).__name__}"
    return None if text else f"{column} is empty"


class PipelineScorer:
    """Callable class for `Dataset.map_batches`: each pool actor owns one stage pipeline."""

    def __init__(self, config: ScoreConfig):
        from ..engine.llm import LLM

        self.cfg = config
        self.llm = LLM(config=config.engine)
        self.max_len = self.llm.engine.capacity.max_model_len
        self.tok = self.llm.tokenizer

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        prompts, errors = [], []
        for text in batch[self.cfg.text_column].tolist():
            ids, err = self._encode(text)
            prompts.append(ids)
            errors.append(err)
        good = [i for i, e in enumerate(errors) if e is None]
        results = self._run([prompts[i] for i in good]) if good else []
        cols: dict[str, list] = {c: [None] * len(batch) for c in OUTPUT_COLUMNS[self.cfg.task]}
        if self.cfg.token_logprobs and self.cfg.task == "loglik":
            cols["token_logprobs"] = [None] * len(batch)
        for i, res in zip(good, results):
            for k, v in res.items():
                cols[k][i] = v
        cols["error"] = [e if e is not None else cols["error"][i] for i, e in enumerate(errors)]
        out = batch.copy()
        for k, v in cols.items():  # (a plain list with None would make the integers floats)
            out[k] = pd.array(v, dtype="Int64") if k in INT_COLUMNS else v
        return out

    def _encode(self, text) -> tuple[list[int] | None, str | None]:
        err = text_error(text, self.cfg.text_column)
        if err:
            return None, err
        ids = self.tok(text).input_ids
        limit = self.max_len - (
            1 if self.cfg.task != "generate" else self.cfg.sampling.get("max_tokens", 16)
        )
        if len(ids) > limit:
            if self.cfg.too_long == "error":
                return None, f"{len(ids)} tokens exceed the limit of {limit}"
            ids = ids[:limit]
        return ids, None

    def _run(self, prompts: list[list[int]]) -> list[dict]:
        try:
            if self.cfg.task == "loglik":
                return self._loglik(prompts)
            if self.cfg.task == "classify":
                return self._classify(prompts)
            return self._generate(prompts)
        except JambaRayError as e:  # one bad row must not fail the batch: retry row by row
            if len(prompts) == 1:
                return [{"error": str(e)}]
            return [r for p in prompts for r in self._run([p])]

    def _loglik(self, prompts) -> list[dict]:
        outs = self.llm.generate(
            prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        )
        res = []
        for o in outs:
            lps = [e[t] for t, e in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
            total = float(sum(lps))
            row = {
                "logprob": total,
                "num_tokens": len(o.prompt_token_ids),
                "perplexity": math.exp(-total / len(lps)) if lps else None,
            }
            if self.cfg.token_logprobs:
                row["token_logprobs"] = lps
            res.append(row)
        return res

    def _classify(self, prompts) -> list[dict]:
        outs = self.llm.generate(prompts, SamplingParams(max_tokens=1), task="classify")
        res = []
        for o in outs:
            logits = o.scores
            m = max(logits)
            exp = [math.exp(x - m) for x in logits]
            probs = [e / sum(exp) for e in exp]
            res.append(
                {
                    "label": int(max(range(len(probs)), key=probs.__getitem__)),
                    "probs": probs,
                    "logits": logits,
                    "num_tokens": len(o.prompt_token_ids),
                }
            )
        return res

    def _generate(self, prompts) -> list[dict]:
        outs = self.llm.generate(prompts, SamplingParams(**self.cfg.sampling))
        return [
            {
                "completion": o.outputs[0].text,
                "finish_reason": o.outputs[0].finish_reason,
                "num_tokens": len(o.prompt_token_ids) + len(o.outputs[0].token_ids),
            }
            for o in outs
        ]

    def __del__(self):
        try:
            self.llm.shutdown()
        except Exception:
            pass
