"""Decode steps at fixed shapes, captured as CUDA graphs on GPUs.

A decode step is launch-bound on GPUs: a few dozen small kernels per layer for one token per row
(the H100 check measured 14-29% of copy bandwidth). A CUDA graph replays the whole step with one
launch, but needs fixed shapes and no host syncs, so the step runs on static buffers:

- the batch is padded to a bucket; padding rows use the scratch slot (the pipeline's probe slot,
  which every probe resets) at position 0, so they never touch a live sequence's state;
- attention reads a bucketed KV length, masked from the positions (`Layout.kv_len`);
- MoE runs transformers' `grouped_mm` experts (sort + histc: no `nonzero`, no host sync).

One graph per (batch bucket, KV-length bucket), captured on first use, all in one memory pool.
Captures need bf16 on SM90+ (elsewhere torch's grouped_mm falls back to a host-synced loop); a
bucket whose per-layer KV gather would exceed GRAPH_KV_BYTES decodes eagerly (the eager path reads
consecutive slots in place), as does a bucket whose capture ran out of memory; any other capture
failure turns graphs off for the stage, logged and named in its stats. On CPU the same
fixed-shape step runs eagerly: that is how CI checks the padding and bucketing against the
reference; the capture itself only happens on CUDA.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..engine.messages import StepMessage
from .layout import Layout

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_KV_BUCKET = 256
GRAPH_KV_BYTES = 1 << 30  # K+V of one attention layer gathered for a bucket, at most


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


def kv_bucket(kv_len: int, max_len: int) -> int:
    """Powers of two from MIN_KV_BUCKET, capped at the pool's length."""
    b = MIN_KV_BUCKET
    while b < kv_len:
        b *= 2
    return min(b, max_len)


@contextlib.contextmanager
def static_experts(config):
    """MoE blocks dispatch on the config at call time; grouped_mm keeps shapes fixed."""
    before = getattr(config, "_experts_implementation", "eager")
    config._experts_implementation = "grouped_mm"
    try:
        yield
    finally:
        config._experts_implementation = before


@dataclass(slots=True)
class Entry:
    """One bucket's static buffers (and its graph on CUDA)."""

    x: torch.Tensor  # [B] token ids (first stage) or [B, H] hidden states
    slots: torch.Tensor  # [B]
    pos: torch.Tensor  # [B]
    table: torch.Tensor  # [B, NB] block tables, padded with the scratch block
    layout: Layout
    out: torch.Tensor | None = None
    graph: object | None = None
    eager: bool = False  # this bucket's capture ran out of memory: it decodes eagerly


class DecodeGraphs:
    def __init__(
        self,
        model,
        pool,
        config,
        *,
        first: bool,
        device: str,
        dtype: torch.dtype,
        scratch_slot: int,
        scratch_block: int,
        max_batch: int,
    ):
        self.model, self.pool, self.config = model, pool, config
        self.first, self.device, self.dtype = first, device, dtype
        self.scratch_slot, self.scratch_block = scratch_slot, scratch_block
        self.buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (
            bucket(max_batch, BATCH_BUCKETS) or max_batch,
        )
        self.entries: dict[tuple[int, int], Entry] = {}
        self.capture = device == "cuda"
        self.disabled: str | None = None  # why graphs were turned off, if they were
        if self.capture and not (
            dtype == torch.bfloat16 and torch.cuda.get_device_capability() >= (9, 0)
        ):
            self.disabled = "CUDA graphs need bf16 on SM90+ (grouped_mm experts); decoding eagerly"
            log.warning("decode graphs off: %s", self.disabled)
        self.mempool = (
            torch.cuda.graph_pool_handle() if self.capture and not self.disabled else None
        )
        s = pool.shape
        # K+V gathered per row and position for one attention layer (none: nothing is gathered)
        self.kv_row_bytes = 2 * s.kv_heads * s.head_dim * pool.k.element_size() if s.n_attn else 0
        self.steps = 0

    def eligible(self, msg: StepMessage) -> bool:
        return (
            self.disabled is None
            and len(msg.segments) <= self.buckets[-1]
            and all(s.is_decode and s.logits != "score" for s in msg.segments)
        )

    def _key(self, msg: StepMessage) -> tuple[int, int] | None:
        b = bucket(len(msg.segments), self.buckets)
        kv = kv_bucket(max(s.start for s in msg.segments) + 1, self.pool.shape.max_len)
        return (b, kv) if b * kv * self.kv_row_bytes <= GRAPH_KV_BYTES else None

    def run(self, msg: StepMessage, x: torch.Tensor, tables: dict) -> torch.Tensor | None:
        """Hidden states [n, H], or logits [R, V] on the last stage, for a decode-only micro-batch;
        None when this micro-batch is not one (or graphs are off): the caller runs it eagerly."""
        key = self._key(msg) if self.eligible(msg) else None
        if key is None:
            return None
        n = len(msg.segments)
        entry = self.entries.get(key) or self._build(*key)
        if self.disabled is not None or entry.eager:
            return None
        entry.x[:n].copy_(x)
        entry.slots[:n].copy_(torch.tensor([s.slot for s in msg.segments]))
        entry.pos[:n].copy_(torch.tensor([s.start for s in msg.segments]))
        entry.slots[n:].fill_(self.scratch_slot)
        entry.pos[n:].zero_()
        entry.table.copy_(self._tables(msg, tables, entry.table.shape))
        if entry.graph is not None:
            entry.graph.replay()
            out = entry.out
        else:
            out = self._step(entry)
        self.steps += 1
        out = out[:n]
        if self.model.last:  # rows that asked for no logits drop out, as in the eager path
            rows = msg.logit_rows()
            out = out[rows] if len(rows) < n else out
        return out.clone()  # the next replay overwrites the graph's output buffer

    def _tables(self, msg: StepMessage, tables: dict, shape: tuple[int, int]) -> torch.Tensor:
        """[B, NB]: each row's blocks, then the scratch block (masked: past the row's position)."""
        rows = [tables[s.seq_id][: shape[1]] for s in msg.segments]
        rows += [[]] * (shape[0] - len(rows))
        return torch.tensor([r + [self.scratch_block] * (shape[1] - len(r)) for r in rows])

    def _step(self, entry: Entry) -> torch.Tensor:
        with static_experts(self.config):
            return self.model.run(entry.layout, entry.x, self.pool)

    def _build(self, b: int, kv_len: int) -> Entry:
        dev = self.device
        shape = (b,) if self.first else (b, self.config.hidden_size)
        x = torch.zeros(shape, dtype=torch.long if self.first else self.dtype, device=dev)
        slots = torch.full((b,), self.scratch_slot, dtype=torch.long, device=dev)
        pos = torch.zeros(b, dtype=torch.long, device=dev)
        bs = self.pool.shape.block_size
        table = torch.full((b, -(-kv_len // bs)), self.scratch_block, dtype=torch.long, device=dev)
        lay = Layout.fixed_decode(slots, pos, table, table[:, 0], bs)
        entry = Entry(x, slots, pos, table, lay)
        if self.capture:
            try:
                self._capture(entry)
            except torch.cuda.OutOfMemoryError:
                log.warning(
                    "decode graph for batch %d, kv %d did not fit; that bucket decodes eagerly",
                    b,
                    kv_len,
                )
                entry.eager = True
            except Exception as e:  # a kernel that cannot be captured: decode eagerly from now on
                self.disabled = f"capture at batch {b}, kv {kv_len} failed: {type(e).__name__}: {e}"
                log.warning("decode graphs off: %s", self.disabled)
                return entry
        self.entries[(b, kv_len)] = entry
        return entry

    def _capture(self, entry: Entry) -> None:
        """Warm up on a side stream (all rows on the scratch slot), then record one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(entry)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread may query events meanwhile; that must not void it
        with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode="thread_local"):
            entry.out = self._step(entry)
        entry.graph = graph

    def stats(self) -> dict:
        return {
            "decode_graph_steps": self.steps,
            "decode_graph_shapes": len(self.entries),
            "decode_graphs_captured": sum(e.graph is not None for e in self.entries.values()),
            "decode_graph_eager_buckets": sum(e.eager for e in self.entries.values()),
            "decode_graphs_disabled": self.disabled,
        }
