"""The grammar behind a forced tool call, over the tiny model's vocabulary: the call exactly as the
template renders it (no free whitespace, no raw control character), EOS only after the end tag.
No server: the last stage's own mask (Constraints)."""

from __future__ import annotations

from jamba_ray.serve.protocol import ChatCompletionRequest
from jamba_ray.serve.tools import forced
from tests.serve.conftest import MODEL
from tests.serve.test_tools import ASK, BOUNDED_TOOLS


def allowed_after(tiny_ckpt, spec, ids: list[int]) -> set[int]:
    """The tokens the grammar allows after `ids` (the last stage's own mask)."""
    import torch
    from transformers import AutoTokenizer

    from jamba_ray.model.grammar import Constraints

    vocab = len(AutoTokenizer.from_pretrained(tiny_ckpt))
    table = Constraints(eos_id=2)
    table.admit(1, spec, tuple(ids))
    logits = torch.zeros(1, vocab)
    table.constrain([1], vocab)(logits)
    return {t for t in range(vocab) if logits[0, t] > float("-inf")}


def test_a_forced_call_has_no_free_whitespace_and_may_end_only_after_its_end_tag(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    req = ChatCompletionRequest(model=MODEL, messages=ASK, tools=BOUNDED_TOOLS,
                                tool_choice="required", parallel_tool_calls=False)  # fmt: skip
    spec = forced(req, tiny_ckpt)
    reply = '<tool_calls>[{"name": "get_weather", "arguments": {"city": "Pa ris", "days": 2}}]'
    ids = tok(reply + "</tool_calls>", add_special_tokens=False).input_ids
    breaks = {t for t in range(len(tok)) if set(tok.decode([t])) & set("\t\r\n")}
    for n in range(len(ids) + 1):
        allowed = allowed_after(tiny_ckpt, spec, ids[:n])
        assert not allowed & breaks, tok.decode(ids[:n])  # (nor raw controls in strings)
        assert (tok.eos_token_id in allowed) == (n == len(ids)), tok.decode(ids[:n])
        assert n == len(ids) or ids[n] in allowed
