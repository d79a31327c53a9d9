"""One pipeline stage, run in a Ray actor or in-process: it loads its slice (`model/loader.py`),
applies each step message to its state pool (`StatePool.apply`), runs its layers, and hands on
hidden states or, last, a `StepResult`. Sizing its state is `stage_state.py`'s job."""

from __future__ import annotations

import logging
import os
import time
from collections import deque

import torch

from ..engine.messages import StepMessage, StepResult
from ..errors import StageFailedError
from ..model.kernels import selfcheck
from ..model.loader import load_slice_model
from .last_stage import SamplingTable
from .stage_spec import StageSpec
from .stage_state import build_state, state_budget
from .transport import Handoff, PeerLink, StageError, free_address
from .wire import pack, unpack


class Stage:
    def __init__(self, spec: StageSpec):
        torch.set_num_threads(max(1, spec.threads))
        # a test knob: a replacement that loads as slowly as a real slice
        time.sleep(float(os.environ.get("JAMBA_RAY_STAGE_START_DELAY_S", 0)))
        logging.getLogger("jamba_ray").setLevel(logging.INFO)  # what it loads, in its worker log
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise StageFailedError(f"stage {spec.index} was placed for CUDA but sees no GPU")
        self.spec = spec
        self.model, self.config = load_slice_model(spec)
        self.pool, self.graphs = None, None
        if spec.blocks:  # else sized later: allocate(), after measure()
            self.allocate(spec)
        self.sampling = SamplingTable(spec.eos_id, spec.model) if spec.last else None
        self.link: PeerLink | None = None  # set by connect() when hidden states go point-to-point
        self.graph: str | None = None  # "compiled/shm" or "compiled/nccl" once step() has run
        self.exported: tuple[int, list[tuple]] | None = None  # (step, items) for take_export()
        self.trace: deque[tuple[int, float, float]] = deque(maxlen=4096)  # (step, start, end) wall
        self.counters = {
            "steps": 0,
            "tokens": 0,
            "prefill_segments": 0,
            "prefill_tokens": 0,
            "busy_s": 0.0,
            "sampled_rows": 0,
        }

    def allocate(self, spec: StageSpec) -> None:
        """Build the state pool (and the fixed-shape decode steps on it) at `spec`'s sizes."""
        self.spec, self.pool, self.graphs = spec, None, None  # the old pool goes first
        self.pool, self.graphs = build_state(self.model, self.config, spec)

    def measure(self, utilization: float, tokens: int) -> int:
        """Bytes this GPU can give to state (`stage_state.state_budget`)."""
        return state_budget(self.model, self.config, self.spec, utilization, tokens)

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

    def forward(self, msg: StepMessage, x, on_device: bool = False):
        """Run this stage's layers on one micro-batch; state is read and written by slot.

        `x` is token ids (first stage), or hidden states, or a `Handoff` when they come
        point-to-point; the receive comes first and the send last, so a step that fails leaves the
        link in step. The last stage returns a `StepResult`, the others their hidden states (as
        a device tensor with `on_device`: a compiled graph's NCCL channel takes it from there)."""
        t0, wall0 = time.perf_counter(), time.time()
        x = self.link.recv(x) if isinstance(x, Handoff) else unpack(x).to(self.spec.device)
        # Alone in the pipeline a stage may use all its threads; with k micro-batches in flight
        # the k busy stages share the cores.
        torch.set_num_threads(max(1, self.spec.threads // max(1, msg.in_flight)))
        if self.sampling is not None:
            self.sampling.update(msg)
        exported = self.pool.apply(msg)
        if exported is not None:
            self.exported = (msg.step_id, exported)
        with torch.inference_mode():
            tables = self.pool.tables
            out = self.graphs.run(msg, x, tables) if self.graphs is not None else None
            if out is None:  # not a decode-only micro-batch, or graphs are off
                out = self.model(msg, x, self.pool, tables)
            self.pool.emit_ends(msg)
            if self.sampling is not None:
                out = self._result(msg, out)
        self._count(msg, t0, wall0)
        if self.sampling is not None:
            return out
        if self.link is not None:
            return self.link.send(out)
        return out if on_device else pack(out.cpu())

    def step(self, msg: StepMessage, x, on_device: bool = False):
        """A compiled graph's call (`runtime/compiled.py`): forward(), and this stage's exports
        as a second output that goes straight to the driver. It never raises: a failure, here or
        upstream, travels on as a `StageError` (the later stages skip the step)."""
        self.graph = "compiled/nccl" if on_device else "compiled/shm"
        if isinstance(x, StageError):
            return x, []
        try:
            out = self.forward(msg, x, on_device)
            return out, self.take_export(msg.step_id, True) if msg.num_exports else []
        except Exception as e:
            return StageError(self.spec.index, f"{type(e).__name__}: {e}"), []

    def take_export(self, step_id: int, as_list: bool = False):
        """The copies step `step_id` exported (the driver calls this right after the step, so
        it owns them and they outlive this stage): one return value each, or one list."""
        if self.exported is None or self.exported[0] != step_id:
            raise StageFailedError(f"step {step_id} exported nothing here")
        items, self.exported = self.exported[1], None
        if as_list:
            return items
        return items[0] if len(items) == 1 else tuple(items)

    def import_state(self, ckpts: list[int], blocks: list[int], *items) -> None:
        """A replacement takes over its predecessor's exported checkpoints and KV blocks."""
        self.pool.load(ckpts, blocks, list(items))

    def _result(self, msg: StepMessage, out) -> StepResult:
        logits, scores = (out["logits"], out["scores"]) if isinstance(out, dict) else (out, None)
        res = self.sampling.result(msg, logits.float(), scores)
        self.counters["sampled_rows"] += len(res.samples)
        return res

    def _count(self, msg: StepMessage, t0: float, wall0: float) -> None:
        for s in msg.segments:
            if not s.is_decode:
                self.counters["prefill_segments"] += s.start == 0
                self.counters["prefill_tokens"] += s.length
        self.counters["steps"] += 1
        self.counters["tokens"] += msg.num_tokens
        self.counters["busy_s"] += time.perf_counter() - t0
        self.trace.append((msg.step_id, wall0, time.time()))

    def stats(self) -> dict:
        tensors = (*self.model.parameters(), *self.model.buffers())
        return {
            "stage": self.spec.index,
            "pid": os.getpid(),
            "layers": [self.spec.start, self.spec.end],
            "param_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "pool_bytes": self.pool.nbytes(),
            "transport": self.graph
            or (f"p2p/{self.link.backend}" if self.link else "object_store"),
            "p2p_sent": self.link.sent if self.link else 0,
            "p2p_received": self.link.received if self.link else 0,
            "p2p_bytes_sent": self.link.bytes_sent if self.link else 0,
            "sampling_rows": len(self.sampling.rows) if self.sampling is not None else 0,
            "block_tables": len(self.pool.tables),
            **(self.graphs.stats() if self.graphs else {}),
            **selfcheck.stats(),  # kernel_fallbacks per kernel name, each self-check's verdict
            **self.counters,
        }

    def get_trace(self) -> list[tuple[int, float, float]]:
        return list(self.trace)

    def param_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
