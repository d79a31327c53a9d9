"""Logprobs in the wire shapes: OpenAI completions (tokens, text_offset), chat (content items),
and vLLM's `prompt_logprobs`. Offsets index the text the client receives, across stream chunks.
"""

from __future__ import annotations

from ..engine.tokenizer import IncrementalDetokenizer


class Offsets:
    """Where each token starts in the text built from these tokens (the same incremental
    detokenizer as the engine's: special tokens take no room when skipped, and the tokens of one
    split character all start where it does). `start` is where this text begins in the reply."""

    def __init__(self, tok, skip_special_tokens: bool = True, start: int = 0):
        self.detok = IncrementalDetokenizer(tok, skip_special_tokens)
        self.pos = start

    def push(self, token_ids: list[int]) -> list[int]:
        starts = []
        for t in token_ids:
            starts.append(self.pos)
            self.pos += len(self.detok.push([t]))
        return starts

    def text(self) -> str:
        """All the text so far, held-back bytes included (call once, at the end)."""
        self.detok.flush()
        return self.detok.text


def _top(entry: dict[int, float], token: int, k: int) -> dict[int, float]:
    """The sampled token and the k most likely (an entry may hold more, when asked twice)."""
    best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
    return {token: entry[token], **dict(best)}


def completion_logprobs(token_text, ids, entries, offsets: list[int], k: int) -> dict:
    """OpenAI's completions `logprobs`; an entry of None (the first prompt token) has none."""
    tokens, chosen, tops = [], [], []
    for tid, entry in zip(ids, entries):
        tokens.append(token_text(tid))
        chosen.append(None if entry is None else entry[tid])
        tops.append(
            None if entry is None else {token_text(t): v for t, v in _top(entry, tid, k).items()}
        )
    return {
        "tokens": tokens,
        "token_logprobs": chosen,
        "top_logprobs": tops,
        "text_offset": offsets[: len(tokens)],
    }


def chat_logprobs(token_text, ids, entries, k: int) -> dict:
    def item(tid: int, lp: float) -> dict:
        text = token_text(tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = []
    for tid, entry in zip(ids, entries or []):
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        content.append({**item(tid, entry[tid]), "top_logprobs": [item(t, v) for t, v in top]})
    return {"content": content}


def prompt_logprobs(token_text, ids, entries, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else token id ->
    {logprob, rank (among the top k; null when outside), decoded_token}."""
    out: list[dict | None] = []
    for tid, entry in zip(ids, entries):
        if entry is None:
            out.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        rank = {t: r for r, (t, _) in enumerate(ranked[:k], start=1)}
        out.append(
            {
                str(t): {"logprob": v, "rank": rank.get(t), "decoded_token": token_text(t)}
                for t, v in _top(entry, tid, k).items()
            }
        )
    return out
