"""Incremental detokenization and stop strings."""

import pytest

from jamba_ray.engine.outputs import TextTracker
from jamba_ray.engine.tokenizer import IncrementalDetokenizer, encode_prompt, load_tokenizer
from jamba_ray.errors import InvalidRequestError

TEXT = "hello café 東京 🙂 naïve"


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


def test_token_by_token_deltas_never_split_a_multibyte_character(tok):
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert len(ids) > len(TEXT.split())  # some characters span several byte tokens
    d = IncrementalDetokenizer(tok)
    pieces = [d.push([i]) for i in ids]
    assert "" in pieces  # it held back partial characters...
    assert all("\ufffd" not in p for p in pieces)  # ...and never emitted half of one
    assert "".join(pieces) == TEXT


def test_stop_string_split_across_tokens_is_never_emitted(tok):
    ids = tok(TEXT, add_special_tokens=False).input_ids
    t = TextTracker(tok, stop=("東京",), skip_special_tokens=True)
    out, stopped = "", False
    for i in ids:
        piece, stopped = t.push([i])
        out += piece
        if stopped:
            break
    assert stopped and out == "hello café "


def test_prompt_encoding_checks_ids(tok):
    assert encode_prompt(tok, "hi", 512)[0] == 1
    assert encode_prompt(tok, [1, 2, 3], 512) == [1, 2, 3]
    for bad in ([], [1, "a"], [True], 5):
        with pytest.raises(InvalidRequestError):
            encode_prompt(tok, bad, 512)
