"""Per-request sampling parameters, validated before anything is scheduled. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidRequestError

MAX_LOGPROBS = 20


def _fail(msg: str, param: str | None = None):
    raise InvalidRequestError(msg, param)


def _as_str_tuple(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if s)
    _fail(f"stop must be a string or a list of strings, got {type(stop).__name__}", "stop")


def _as_int_tuple(ids, name: str) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        return tuple(ids)
    _fail(f"{name} must be a list of integers", name)


GRAMMAR_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """A grammar the output must follow (vLLM's structured outputs): exactly one of `json` (a
    JSON schema, as JSON text), `json_object`, `regex`, `choice`, `grammar` (EBNF) or
    `structural_tag` (xgrammar's JSON form). The last stage masks every step's logits with it and
    allows EOS only where the grammar may end. Checked here, so a bad one is refused up front."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    any_whitespace: bool = True  # vLLM's disable_any_whitespace, negated
    tokenizer: str | None = (
        None  # the tokenizer the mask is built for (the fronts set the engine's)
    )

    def __post_init__(self) -> None:
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                _fail("choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in GRAMMAR_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            _fail(f"structured outputs take exactly one of {', '.join(GRAMMAR_KINDS)}; got {given}")
        from .grammars import check  # xgrammar, only for requests that use it

        check(self)

    @property
    def kind(self) -> str:
        return next(k for k in GRAMMAR_KINDS if getattr(self, k) not in (None, False))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """vLLM-style sampling parameters. `temperature=0` is greedy."""

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    structured: StructuredOutputs | None = None
    priority: int = 0  # lower runs first (vLLM's priority scheduling)
    # vLLM's cache_salt: only requests with the same salt share cached prefixes (None: no salt)
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_str_tuple(self.stop))
        object.__setattr__(
            self, "stop_token_ids", _as_int_tuple(self.stop_token_ids, "stop_token_ids")
        )
        self._check_counts()
        self._check_ranges()
        self._check_structured()
        salt = self.cache_salt
        if salt is not None and not (isinstance(salt, str) and salt):
            _fail(f"cache_salt must be a non-empty string when given, got {salt!r}", "cache_salt")

    def _check_structured(self) -> None:
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            _fail(f"priority must be an integer, got {self.priority!r}", "priority")
        if self.structured is None:
            return
        if not isinstance(self.structured, StructuredOutputs):
            _fail("structured must be a StructuredOutputs", "structured")
        # Both would keep the sequence past the grammar's end, where no token is allowed.
        if self.ignore_eos:
            _fail("ignore_eos cannot be combined with structured outputs", "ignore_eos")
        if self.min_tokens:
            _fail("min_tokens cannot be combined with structured outputs", "min_tokens")

    def _check_counts(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            _fail(f"n must be at least 1, got {self.n}", "n")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            _fail(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.min_tokens < 0:
            _fail(f"min_tokens must be non-negative, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                "min_tokens",
            )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                _fail(f"{name} must be between 0 and {MAX_LOGPROBS}, got {v}", name)
        if self.seed is not None and not isinstance(self.seed, int):
            _fail(f"seed must be an integer, got {self.seed!r}", "seed")

    def _check_ranges(self) -> None:
        if self.temperature < 0:
            _fail(f"temperature must be non-negative, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            _fail(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k == 0 or self.top_k < -1:
            _fail(f"top_k must be -1 (disabled) or at least 1, got {self.top_k}", "top_k")
        if not 0 <= self.min_p <= 1:
            _fail(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                _fail(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if self.repetition_penalty <= 0:
            _fail(
                f"repetition_penalty must be positive, got {self.repetition_penalty}",
                "repetition_penalty",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )
