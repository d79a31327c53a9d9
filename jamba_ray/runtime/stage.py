"""One pipeline stage: its slice of Jamba and its state pool. Runs in a Ray actor or in-process."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from ..config.model_path import resolve
from ..config.spec import canonical_dtype
from ..engine.messages import Segment, StepMessage, StepResult
from ..errors import StageFailedError
from ..model.checkpoint import load_slice
from ..model.decode_graphs import DecodeGraphs
from ..model.quant import quantize_slice
from ..model.slice import SliceModel
from ..model.state_pool import StatePool
from .last_stage import SamplingTable
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
    slots: int  # Mamba state slots, the probe slot included (the last one)
    max_len: int
    blocks: int = 0  # KV blocks, the probe's scratch block included (the last one)
    block_size: int = 16
    checkpoints: int = 0  # Mamba checkpoints for prefix reuse
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1
    quantization: str | None = None  # "int8": weight-only, Mamba excluded
    decode_graphs: bool = False  # fixed-shape decode steps, CUDA graphs on GPUs
    eos_id: int | None = None

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1


def stage_specs(config, model: str, plans, eos_id: int | None) -> list[StageSpec]:
    """One spec per stage plan, its state not sized yet (`sized`); the device is decided here."""
    device = "cuda" if config.placement.num_gpus_per_stage else "cpu"
    m, c = config.model, config.compute
    return [
        StageSpec(
            model,
            p.index,
            p.start,
            p.end,
            len(plans),
            0,
            0,
            dtype=m.dtype,
            device=device,
            threads=c.threads_per_stage,
            quantization=m.quantization,
            decode_graphs=c.decode_graphs,
            eos_id=eos_id,
        )
        for p in plans
    ]


def sized(spec: StageSpec, capacity) -> StageSpec:
    """`spec` with its state pool's sizes: the engine's slots and blocks plus the probe's own."""
    return replace(
        spec,
        slots=capacity.max_num_seqs + 1,
        max_len=capacity.max_model_len,
        blocks=capacity.num_blocks + 1,
        block_size=capacity.block_size,
        checkpoints=capacity.num_checkpoints,
    )


def probe_message(spec: StageSpec) -> StepMessage:
    """One token on the probe's own slot and block (the last of each): it touches no sequence."""
    probe = Segment(-1, spec.slots - 1, 0, 1, "none", blocks=(spec.blocks - 1,))
    return StepMessage(-1, (probe,), finished=(-1,))


class Stage:
    def __init__(self, spec: StageSpec):
        torch.set_num_threads(max(1, spec.threads))
        # a test knob: a replacement that loads as slowly as a real slice
        time.sleep(float(os.environ.get("JAMBA_RAY_STAGE_START_DELAY_S", 0)))
        logging.getLogger("jamba_ray").setLevel(logging.INFO)  # what it loads, in its worker log
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise StageFailedError(f"stage {spec.index} was placed for CUDA but sees no GPU")
        self.spec = spec
        self.model, self.config = _load(spec)
        self.pool, self.graphs = None, None
        if spec.blocks:  # else sized later: allocate(), after measure()
            self.allocate(spec)
        self.sampling = SamplingTable(spec.eos_id, spec.model) if spec.last else None
        self.tables: dict[int, list[int]] = {}  # each sequence's KV block table
        self.link: PeerLink | None = None  # set by connect() when hidden states go point-to-point
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
        self.spec, self.pool, self.graphs = spec, None, None
        dtype = getattr(torch, canonical_dtype(spec.dtype))
        self.pool = StatePool(self.model.pool_shape(self.config, spec), dtype, spec.device)
        if spec.decode_graphs:  # padding rows go to the last slot and block: the probe's
            self.graphs = DecodeGraphs(
                self.model,
                self.pool,
                self.config,
                first=spec.first,
                device=spec.device,
                dtype=dtype,
                scratch_slot=spec.slots - 1,
                scratch_block=spec.blocks - 1,
                max_batch=spec.slots - 1,
            )

    def measure(self, utilization: float, tokens: int) -> int:
        """Bytes this GPU can give to state: `utilization` of the device, less what the weights and
        the peak of a `tokens`-token prefill (on a throwaway pool) take."""
        if self.spec.device != "cuda":
            raise StageFailedError("measure() sizes GPU stages; CPU stages take state_memory_gib")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        blocks = -(-tokens // self.spec.block_size) + 1
        probe = replace(
            self.spec, slots=2, blocks=blocks, checkpoints=0, max_len=tokens, decode_graphs=False
        )
        self.allocate(probe)
        msg = StepMessage(0, (Segment(0, 0, 0, tokens, "all", blocks=tuple(range(blocks - 1))),))
        x = (
            torch.zeros(tokens, dtype=torch.long)
            if self.spec.first
            else torch.zeros(
                tokens,
                self.config.hidden_size,
                dtype=getattr(torch, canonical_dtype(self.spec.dtype)),
            )
        )
        with torch.inference_mode():
            self.model(msg, x.to(self.spec.device), self.pool, {0: list(range(blocks - 1))})
        torch.cuda.synchronize()
        peak, total = (
            torch.cuda.max_memory_allocated(),
            torch.cuda.get_device_properties(0).total_memory,
        )
        self.pool = None
        torch.cuda.empty_cache()
        return int(total * utilization - peak)

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

        `x` is token ids (first stage), or hidden states, or a `Handoff` when they come
        point-to-point; the receive comes first and the send last, so a step that fails leaves the
        link in step. The last stage returns a `StepResult`, the others their hidden states."""
        t0, wall0 = time.perf_counter(), time.time()
        x = self.link.recv(x) if isinstance(x, Handoff) else unpack(x).to(self.spec.device)
        # Alone in the pipeline a stage may use all its threads; with k micro-batches in flight
        # the k busy stages share the cores.
        torch.set_num_threads(max(1, self.spec.threads // max(1, msg.in_flight)))
        self._prepare(msg)
        with torch.inference_mode():
            out = self.graphs.run(msg, x, self.tables) if self.graphs is not None else None
            if out is None:  # not a decode-only micro-batch, or graphs are off
                out = self.model(msg, x, self.pool, self.tables)
            if self.sampling is not None:
                out = self._result(msg, out)
        self._count(msg, t0, wall0)
        if self.sampling is not None:
            return out
        if self.link is not None:
            return self.link.send(out)
        return pack(out.cpu())

    def _prepare(self, msg: StepMessage) -> None:
        """The state operations, in the message's order, then each segment's table and slot."""
        for sid in msg.finished:
            self.tables.pop(sid, None)
        for src, dst in msg.copies:
            self.pool.copy_block(src, dst)
        for f in msg.forks:
            self.pool.fork(f.src, list(f.dsts))
        for slot, ckpt in msg.saves:
            self.pool.save(slot, ckpt)
        if msg.num_exports:
            self.exported = (msg.step_id, self.pool.export(msg.export_ckpts, msg.export_blocks))
        if self.sampling is not None:
            self.sampling.update(msg)
        for s in msg.segments:
            kept = self.tables.get(s.seq_id, [])[: s.table_start]
            table = self.tables[s.seq_id] = kept + list(s.blocks)
            self.pool.check(s.slot, s.end, table)
            if s.restore is not None:
                self.pool.restore(s.restore, s.slot)
            elif s.start == 0:
                self.pool.start(s.slot)

    def take_export(self, step_id: int):
        """The copies step `step_id` exported (the driver calls this right after the step, so
        it owns them and they outlive this stage): one return value each."""
        if self.exported is None or self.exported[0] != step_id:
            raise StageFailedError(f"step {step_id} exported nothing here")
        items, self.exported = self.exported[1], None
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
            "transport": f"p2p/{self.link.backend}" if self.link else "object_store",
            "p2p_sent": self.link.sent if self.link else 0,
            "p2p_received": self.link.received if self.link else 0,
            "p2p_bytes_sent": self.link.bytes_sent if self.link else 0,
            "sampling_rows": len(self.sampling.rows) if self.sampling is not None else 0,
            "block_tables": len(self.tables),
            **(self.graphs.stats() if self.graphs else {}),
            **self.counters,
        }

    def get_trace(self) -> list[tuple[int, float, float]]:
        return list(self.trace)

    def param_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]


def _load(spec: StageSpec) -> tuple[SliceModel, object]:
    """The stage's slice, holding exactly its own tensors (read from the shards that have them)."""
    from transformers import JambaConfig

    ckpt = resolve(spec.model)
    config = JambaConfig.from_pretrained(ckpt.root)
    # GPUs: tokens sorted by expert into one grouped GEMM (model/kernels/moe.py); CPU: eager, as
    # from_pretrained picks there
    config._experts_implementation = _experts(spec.device, spec.quantization)
    dtype = getattr(torch, canonical_dtype(spec.dtype))
    tensors, _ = load_slice(
        ckpt, spec.start, spec.end, spec.first, spec.last, config.tie_word_embeddings
    )
    labels = tensors["score.weight"].shape[0] if "score.weight" in tensors else 0
    with torch.device("meta"):
        model = SliceModel(config, spec.start, spec.end, spec.first, spec.last, labels)
    if spec.last and "lm_head.weight" not in tensors:  # a tied head shares the embedding
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    if spec.last and not spec.first:
        tensors.pop("model.embed_tokens.weight", None)
    # Fresh (aligned) copies: a view into the file keeps its byte offset, and on CPU a matmul's
    # bits can depend on its operand's alignment; numerics must not depend on shard layout.
    tensors = {k: _owned(v, spec.device, _param_dtype(k, dtype)) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if spec.quantization == "int8":
        quantize_slice(model)
    return model.eval(), config


def _experts(device: str, quantization: str | None) -> str:
    if device != "cuda" or quantization:  # (int8 experts route in their own loop)
        return "eager"
    from ..model.kernels import moe

    return moe.register()


def _owned(t: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=dtype, device=device)
    out.copy_(t)
    return out


def _param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Mamba's A_log and D stay fp32 below fp32, as in the reference checkpoints' use."""
    if name.endswith(("mamba.A_log", "mamba.D")):
        return torch.float32
    return dtype


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
