"""One pipeline stage: its slice of Jamba and its state pool. `StageActor` is the Ray actor form."""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import torch

from .checkpoint import load_slice, resolve
from .config import canonical_dtype
from .errors import StageFailedError
from .model.decode_graphs import DecodeGraphs
from .model.quant import quantize_slice
from .model.slice import SliceModel
from .model.state_pool import StatePool
from .sampler import sample
from .sequence import StepMessage
from .transport import Handoff, PeerLink, free_address
from .wire import pack, unpack


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What a stage needs to build itself."""

    model: str
    index: int
    start: int
    end: int
    num_stages: int
    slots: int
    max_len: int
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1
    quantization: str | None = None  # "int8": weight-only, Mamba excluded
    decode_graphs: bool = False  # fixed-shape decode steps, CUDA graphs on GPUs (model/decode_graphs.py)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1


class Stage:
    def __init__(self, spec: StageSpec):
        from transformers import JambaConfig

        torch.set_num_threads(max(1, spec.threads))
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise StageFailedError(f"stage {spec.index} was placed for CUDA but sees no GPU")
        self.spec = spec
        ckpt = resolve(spec.model)
        self.config = JambaConfig.from_pretrained(ckpt.root)
        self.config._experts_implementation = "eager"  # what from_pretrained picks on CPU
        dtype = getattr(torch, canonical_dtype(spec.dtype))
        tensors, self.keys_read = load_slice(
            ckpt, spec.start, spec.end, spec.first, spec.last, self.config.tie_word_embeddings
        )
        labels = tensors["score.weight"].shape[0] if "score.weight" in tensors else 0
        with torch.device("meta"):
            model = SliceModel(self.config, spec.start, spec.end, spec.first, spec.last, labels)
        if spec.last and "lm_head.weight" not in tensors:  # tied head shares the embedding
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        if spec.last and not spec.first:
            tensors.pop("model.embed_tokens.weight", None)
        tensors = {k: v.to(device=spec.device, dtype=_param_dtype(k, dtype)) for k, v in tensors.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
        if spec.quantization == "int8":
            quantize_slice(model)
        self.model = model.eval()
        self.pool = StatePool(model.pool_shape(self.config, spec.slots, spec.max_len), dtype, spec.device)
        self.graphs = None
        if spec.decode_graphs:  # padding rows go to the last slot: the pipeline's probe slot
            self.graphs = DecodeGraphs(model, self.pool, self.config, first=spec.first, device=spec.device,
                                       dtype=dtype, scratch_slot=spec.slots - 1, max_batch=spec.slots - 1)
        self.link: PeerLink | None = None  # set by connect() when hidden states go point-to-point
        self.trace: deque[tuple[int, float, float]] = deque(maxlen=4096)  # (step, start, end) wall
        self.counters = {"steps": 0, "tokens": 0, "prefill_segments": 0, "prefill_tokens": 0, "busy_s": 0.0,
                         "sampled_rows": 0}

    def ready(self) -> dict:
        return {"index": self.spec.index, "pid": os.getpid(), "node_id": _node_id()}

    def rendezvous(self) -> str:
        """Stage 0 hosts the group's rendezvous: an address on its own node."""
        from ray.util import get_node_ip_address

        return free_address(get_node_ip_address())

    def connect(self, address: str) -> None:
        """Join (again) the pipeline's group; hidden states then go point-to-point."""
        old, self.link = self.link, None  # if joining fails, no half-closed link stays behind
        if old is not None:
            old.close()
        self.link = PeerLink(self.spec.index, self.spec.num_stages, address, self.spec.device)

    def forward(self, msg: StepMessage, x):
        """Run this stage's layers on one micro-batch; state is read and written by slot.

        `x` is token ids (first stage), or hidden states, or a `Handoff` when they come point-to-point;
        the receive comes first and the send last, so a step that fails leaves the link in step."""
        t0, wall0 = time.perf_counter(), time.time()
        x = self.link.recv(x) if isinstance(x, Handoff) else unpack(x).to(self.spec.device)
        # Alone in the pipeline, a stage may use all its threads; with k micro-batches in flight
        # the k busy stages share the cores.
        torch.set_num_threads(max(1, self.spec.threads // max(1, msg.in_flight)))
        self.pool.release(msg.free)
        for s in msg.segments:
            self.pool.check(s.slot, s.start + s.length)
            if s.start == 0:
                self.pool.start(s.slot)
            if not s.is_decode:
                self.counters["prefill_segments"] += s.start == 0
                self.counters["prefill_tokens"] += s.length
        with torch.inference_mode():
            out = self.graphs.run(msg, x) if self.graphs is not None else None
            if out is None:  # not a decode-only micro-batch, or graphs are off
                out = self.model(msg, x, self.pool)
            if msg.sample and self.spec.last:
                out = self._sample(msg, out)
        self.counters["steps"] += 1
        self.counters["tokens"] += msg.num_tokens
        self.counters["busy_s"] += time.perf_counter() - t0
        self.trace.append((msg.step_id, wall0, time.time()))
        if self.link is not None and not self.spec.last:
            return self.link.send(out)
        if self.spec.device != "cpu":
            out = {k: _to_cpu(v) for k, v in out.items()} if isinstance(out, dict) else out.cpu()
        return pack(out)

    def _sample(self, msg: StepMessage, out) -> dict:
        """sample_on last_stage: tokens (+ logprobs) instead of [rows, vocab] logits for the driver;
        the logits still travel when a segment wants all of its rows (prompt logprobs)."""
        logits = out["logits"] if isinstance(out, dict) else out
        rows = [r for r, _, _ in msg.sample]
        outs = sample(logits[rows].float(), [inp for _, _, inp in msg.sample], msg.eos_id)
        self.counters["sampled_rows"] += len(outs)
        keep = any(s.logits == "all" for s in msg.segments)
        res = {"samples": {sid: o for (_, sid, _), o in zip(msg.sample, outs)}, "logits": logits if keep else None}
        if isinstance(out, dict):
            res["scores"] = out["scores"]
        return res

    def release(self, slots: list[int]) -> None:
        self.pool.release(slots)

    def fork(self, src: int, dsts: list[int], length: int) -> None:
        self.pool.fork(src, dsts, length)

    def stats(self) -> dict:
        return {
            "stage": self.spec.index,
            "pid": os.getpid(),
            "layers": [self.spec.start, self.spec.end],
            "slots_in_use": len(self.pool.in_use - {self.spec.slots - 1}),
            "slots_total": self.spec.slots - 1,  # the last slot is the pipeline's probe slot
            "slots": sorted(self.pool.in_use - {self.spec.slots - 1}),
            "param_bytes": sum(t.numel() * t.element_size()
                               for t in (*self.model.parameters(), *self.model.buffers())),
            "pool_bytes": self.pool.nbytes(),
            "transport": f"p2p/{self.link.backend}" if self.link else "object_store",
            "p2p_sent": self.link.sent if self.link else 0,
            "p2p_received": self.link.received if self.link else 0,
            "p2p_bytes_sent": self.link.bytes_sent if self.link else 0,
            **(self.graphs.stats() if self.graphs else {}),
            **self.counters,
        }

    def get_trace(self) -> list[tuple[int, float, float]]:
        return list(self.trace)

    def param_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]


def _param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Mamba's A_log and D stay fp32 below fp32, as in the reference checkpoints' use."""
    if name.endswith(("mamba.A_log", "mamba.D")):
        return torch.float32
    return dtype


def _to_cpu(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
