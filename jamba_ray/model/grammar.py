"""Structured outputs where the logits are: xgrammar grammars compiled once per spec and
tokenizer, one matcher per constrained sequence, its token bitmask applied to that row's logits.

Only constrained rows pay anything (a bitmask fill per step, a few microseconds on the host);
constrained and free sequences share a batch. A spec reaches the last stage once, inside the
sequence's registered SamplingParams; a matcher is built on the sequence's first draw and replays
the tokens it already has (after a stage failure the driver's tokens are the truth).
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..errors import InvalidRequestError
from .json_strings import strict_strings, strict_tag

log = logging.getLogger(__name__)

MAX_COMPILED = 128  # compiled grammars kept per tokenizer (least recently used dropped)


def _grammar(spec):
    """The spec as an xgrammar Grammar (no tokenizer needed); JSON strings are always legal."""
    import xgrammar as xgr

    if spec.json is not None:
        schema = _strict(spec.json, strict_strings)
        return xgr.Grammar.from_json_schema(schema, any_whitespace=spec.any_whitespace)
    if spec.json_object:  # any object: properties unconstrained
        return xgr.Grammar.from_json_schema(
            '{"type": "object"}', any_whitespace=spec.any_whitespace, strict_mode=False
        )
    if spec.regex is not None:
        return xgr.Grammar.from_regex(spec.regex)
    if spec.choice is not None:
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
    if spec.grammar is not None:
        return xgr.Grammar.from_ebnf(spec.grammar)
    tag = _strict(spec.structural_tag, strict_tag)
    if not spec.any_whitespace:
        tag = _strict(tag, _compact)
    return xgr.Grammar.from_structural_tag(tag)


def _strict(text: str, rewrite: Callable) -> str:
    """JSON text rewritten; text that is not JSON goes on as it is (xgrammar says why)."""
    try:
        return json.dumps(rewrite(json.loads(text)), ensure_ascii=False)
    except ValueError:
        return text


def _compact(node):
    """A structural tag whose JSON schemas allow no free whitespace: a tag's json_schema content
    has only max_whitespace_cnt, so each becomes the grammar any_whitespace=False gives (", " and
    ": " between items, as chat templates render tool calls)."""
    import xgrammar as xgr

    if isinstance(node, list):
        return [_compact(n) for n in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and node.get("style", "json") == "json":
        schema = json.dumps(node["json_schema"], ensure_ascii=False)
        ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
        return {"type": "grammar", "grammar": ebnf}
    return {key: _compact(value) for key, value in node.items()}


def check(spec) -> None:
    """Raise InvalidRequestError (naming the spec's kind) if xgrammar cannot parse it."""
    try:
        _grammar(spec)
    except Exception as e:
        raise InvalidRequestError(
            f"invalid {spec.kind} for structured outputs: {_why(e)}"
        ) from None


def _why(e: Exception) -> str:
    """xgrammar's message without its C++ source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)
    return text.replace("Check failed: (error.empty()) is false: ", "")


class Compiler:
    """Compiles specs against one tokenizer's vocabulary, keeping the recent ones."""

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_id: int | None):
        import xgrammar as xgr
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path)
        stops = [eos_id] if eos_id is not None else None
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=stops)
        self.xgr_compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.compiled: OrderedDict = OrderedDict()

    def compile(self, spec):
        key = (spec.kind, spec.json, spec.regex, spec.choice, spec.grammar, spec.structural_tag,
               spec.any_whitespace)  # fmt: skip
        if key in self.compiled:
            self.compiled.move_to_end(key)
            return self.compiled[key]
        grammar = self.xgr_compiler.compile_grammar(_grammar(spec))
        self.compiled[key] = grammar
        if len(self.compiled) > MAX_COMPILED:
            self.compiled.popitem(last=False)
        return grammar


class Constraints:
    """The last stage's matchers: admit, constrain a batch's rows, accept drawn tokens, forget."""

    def __init__(self, eos_id: int | None, tokenizer_path: str | None = None):
        self.eos_id, self.tokenizer_path = eos_id, tokenizer_path
        self.compilers: dict[tuple[str, int], Compiler] = {}
        self.waiting: dict[int, tuple[object, tuple[int, ...]]] = {}  # seq id -> (spec, tokens)
        self.matchers: dict[int, object] = {}

    def admit(self, seq_id: int, spec, output_ids: tuple[int, ...]) -> None:
        self.matchers.pop(seq_id, None)
        self.waiting[seq_id] = (spec, output_ids)

    def forget(self, seq_id: int) -> None:
        self.waiting.pop(seq_id, None)
        self.matchers.pop(seq_id, None)

    def constrain(self, seq_ids: list[int], vocab_size: int) -> Callable | None:
        """A function masking logits [R, V] in place (row i belongs to seq_ids[i]), or None when
        no row is constrained."""
        if not self.matchers and not self.waiting:  # the common case: nothing to do
            return None
        import xgrammar as xgr

        rows = [i for i, sid in enumerate(seq_ids) if self._matcher(sid, vocab_size) is not None]
        if not rows:
            return None
        bitmask = xgr.allocate_token_bitmask(len(seq_ids), vocab_size)  # [R, ceil(V / 32)] int32
        for i in rows:
            self.matchers[seq_ids[i]].fill_next_token_bitmask(bitmask, i)

        def apply(logits: torch.Tensor) -> None:
            mask = bitmask.to(logits.device, non_blocking=True)
            xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab_size, indices=rows)

        return apply

    def accept(self, seq_id: int, token: int) -> None:
        matcher = self.matchers.get(seq_id)
        if matcher is not None and not matcher.accept_token(token):
            # Only a token drawn against the mask gets here; constraining it further is moot.
            log.warning("sequence %d drew token %d outside its grammar", seq_id, token)
            self.matchers.pop(seq_id)

    def _matcher(self, seq_id: int, vocab_size: int):
        if seq_id in self.waiting:
            import xgrammar as xgr

            spec, tokens = self.waiting.pop(seq_id)
            grammar = self._compiler(spec, vocab_size).compile(spec)
            matcher = xgr.GrammarMatcher(grammar)
            for t in tokens:  # a replay: catch up with the tokens already drawn
                matcher.accept_token(t)
            self.matchers[seq_id] = matcher
        return self.matchers.get(seq_id)

    def _compiler(self, spec, vocab_size: int) -> Compiler:
        path = self.tokenizer_path or spec.tokenizer
        if path is None:
            raise InvalidRequestError("structured outputs need the tokenizer (spec.tokenizer)")
        key = (path, vocab_size)
        if key not in self.compilers:
            self.compilers[key] = Compiler(path, vocab_size, self.eos_id)
        return self.compilers[key]
