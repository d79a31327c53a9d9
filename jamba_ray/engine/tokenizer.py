"""Tokenizer loading, prompt encoding and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidRequestError


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_prompt(tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    """A string is tokenized (with BOS); a list of ints is taken as token ids and range-checked."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt must not be empty")
        return tokenizer(prompt).input_ids
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InvalidRequestError(
            "prompt must be a non-empty string or a non-empty list of token ids"
        )
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise InvalidRequestError("token-id prompts must contain only integers")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    return list(prompt)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a multi-byte character.

    Decodes a short window of ids (from `prefix` to the end) and emits only what lies beyond the
    text
    already emitted for that window, so each step costs O(window), not O(output).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids up to here have been emitted
        self.window_text = ""  # decoded ids[prefix:read]
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        after = self._decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(self.window_text):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        delta = after[len(self.window_text) :]
        # The next window starts at the ids just emitted; its text so far is theirs alone.
        self.window_text = self._decode(self.ids[self.read :]) if self.read else after
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence, emit what was held back (an incomplete character decodes as
        U+FFFD)."""
        after = self._decode(self.ids[self.prefix :])
        delta = after[len(self.window_text) :] if len(after) > len(self.window_text) else ""
        self.prefix = self.read = len(self.ids)
        self.window_text = ""
        self.text += delta
        return delta
