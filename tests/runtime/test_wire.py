"""Stage-to-stage tensors travel as numpy arrays (bf16 as its bit pattern) and come back exact."""

import numpy as np
import torch

from jamba_ray.runtime.wire import pack, unpack


def test_round_trips_are_exact_for_every_dtype_we_send():
    for t in (
        torch.randn(3, 5),
        torch.randn(2, 4).bfloat16(),
        torch.arange(7),
        torch.randn(4).half(),
    ):
        wire = pack(t)
        assert isinstance(wire, (np.ndarray, tuple))
        back = unpack(wire)
        assert back.dtype == t.dtype and torch.equal(back, t)


def test_dicts_and_read_only_buffers():
    sent = {"logits": torch.randn(2, 3), "scores": torch.randn(2, 2).bfloat16(), "n": 3}
    wire = pack(sent)
    wire["logits"].setflags(write=False)  # as the object store hands arrays out
    back = unpack(wire)
    assert set(back) == set(sent) and back["n"] == 3
    for k in ("logits", "scores"):
        assert back[k].dtype == sent[k].dtype and torch.equal(back[k], sent[k])  # same bits
    back["logits"] += 1  # a private copy: safe to modify, and the wire form is untouched
    assert np.array_equal(wire["logits"], sent["logits"].numpy())
