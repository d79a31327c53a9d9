"""What the engine hands back: vLLM-shaped outputs, and the per-sample text/stop tracker."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tokenizer import IncrementalDetokenizer


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None = None  # per token: sampled + top-k
    cumulative_logprob: float = 0.0

    def merge(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.cumulative_logprob = delta.cumulative_logprob
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs


def accumulate(acc: dict, key: int, delta: CompletionOutput) -> CompletionOutput:
    """Fold a streamed delta into `acc[key]` (a fresh CompletionOutput on first sight)."""
    cur = acc.setdefault(key, CompletionOutput(key))
    cur.merge(delta)
    return cur


@dataclass(slots=True)
class RequestOutput:
    """With `delta=True` (streaming), `outputs` hold only what is new since the last one."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None
    delta: bool = True
    scores: list[float] | None = None  # classification head logits (classify requests)
    num_cached_tokens: int = (
        0  # prompt tokens resumed from the prefix cache (OpenAI's cached_tokens)
    )


class TextTracker:
    """Detokenizes one sample and applies stop strings, holding back text that may start one."""

    def __init__(self, tokenizer, stop: tuple[str, ...], skip_special_tokens: bool):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        self.text += self.detok.push(token_ids)
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text = self.text[:at]
                return self._emit(len(self.text)), True
        return self._emit(max(self.emitted, len(self.text) - self.hold)), False

    def flush(self, stopped: bool = False) -> str:
        """Everything left at the end; after a stop string nothing beyond it is added."""
        if not stopped:
            self.text += self.detok.flush()
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out, self.emitted = self.text[self.emitted : upto], upto
        return out
