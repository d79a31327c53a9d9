"""How hidden states travel from one stage to the next.

- `object_store`: a stage returns its hidden states and Ray hands them to the next stage. On GPUs
  that
  is a device-to-host copy, the object store, and a host-to-device copy per hop.
- `compiled`: the stages are bound once into a Ray Compiled Graph (`runtime/compiled.py`); each
  step is one write to its input channel, and hidden states go through its channels (shared
  memory between CPU stages; NCCL between stages with a GPU each).
- `p2p`: the stages of one pipeline form a torch.distributed group (NCCL on GPUs, gloo on CPUs). A
  stage sends its hidden states straight to the next stage's device; only a small `Handoff` (shape,
  dtype, sequence number) travels through Ray, which still orders the work.

Either way, Ray runs each stage's tasks in submission order, so stage i's n-th send meets stage
i+1's n-th receive. A stage receives first and sends last in its step, so a step that fails leaves
the link in step; a lost message shows as a sequence gap and fails loudly instead of mixing batches.
"""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config.engine_config import TRANSPORTS
from ..errors import ConfigError, StageFailedError


@dataclass(frozen=True, slots=True)
class StageError:
    """A compiled graph's stage failed to compute a step: it travels down the rest of the chain as
    a value (the later stages skip the step) and reaches the driver as the step's result. An
    exception raised into the graph instead stalls it (seen with Ray 2.60: after one, the graph
    takes as many more executions as it has buffers, then the next submit blocks)."""

    stage: int
    error: str  # "ExceptionType: message", as a per-task failure reads


def choose(
    transport: str, num_stages: int, device: str, gpus_per_stage: float = 0.0, per_task=False
) -> str:
    """The transport a pipeline uses: `auto` is the compiled graph between two or more GPU stages
    (hidden states over NCCL between stages with a GPU each, else shared memory) and per-task
    (`object_store`) between CPU stages: a compiled graph's idle stages poll their channels, each
    busy on a core (measured: ~0.9 core per idle stage), which on CPUs the stages share would
    take the cores from the stage that works; on GPU hosts each stage's CPU is its own. One stage
    sends nothing: per-task, unless `compiled` is named. `per_task` (the prefix tier on: its
    imports must queue behind the steps in flight on each stage) keeps `auto` per-task."""
    if transport not in TRANSPORTS:
        raise ConfigError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if num_stages == 1 and transport != "compiled":
        return "object_store"  # nothing to send
    own_gpu = device == "cuda" and gpus_per_stage >= 1
    if transport == "auto":
        return "compiled" if device == "cuda" and not per_task else "object_store"
    if transport == "p2p" and device == "cuda" and not own_gpu:
        raise ConfigError(
            "transport p2p on GPUs needs a whole GPU per stage (NCCL cannot connect two "
            "ranks on one device); use object_store for stages that share a GPU"
        )
    return transport


@dataclass(frozen=True, slots=True)
class Handoff:
    """Stands in for a tensor sent point-to-point: what the receiver must allocate, and its turn."""

    shape: tuple[int, ...]
    dtype: str
    seq: int


def free_address(host: str) -> str:
    """A tcp:// rendezvous address on a port free right now on this host."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


class PeerLink:
    """One stage's membership in its pipeline's group: receives from rank-1, sends to rank+1."""

    def __init__(self, rank: int, world: int, address: str, device: str, timeout_s: float = 120.0):
        self.rank, self.world, self.device = rank, world, device
        self.backend = "nccl" if device == "cuda" else "gloo"
        device_id = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else None
        dist.init_process_group(
            self.backend,
            init_method=address,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            device_id=device_id,
        )
        self._handshake()
        self.sent = self.received = self.bytes_sent = 0
        # A send completes when the next stage receives; the tensor must live until then.
        self.pending: deque[tuple[dist.Work, torch.Tensor]] = deque()

    def _handshake(self) -> None:
        """One message down the chain while every stage is in connect(). NCCL creates a pair's
        communicator on its first send/recv and blocks until both ends are there; doing that here
        keeps it out of forward(), where the receiver only arrives after the sender has returned."""
        token = torch.zeros(1, device=self.device)
        if self.rank > 0:
            dist.recv(token, src=self.rank - 1)
        if self.rank < self.world - 1:
            dist.send(token, dst=self.rank + 1)

    def send(self, t: torch.Tensor, max_pending: int = 8) -> Handoff:
        t = t.contiguous()
        while self.pending and (
            self.pending[0][0].is_completed() or len(self.pending) >= max_pending
        ):
            self.pending.popleft()[0].wait()
        self.pending.append((dist.isend(t, dst=self.rank + 1), t))
        handoff = Handoff(tuple(t.shape), str(t.dtype).removeprefix("torch."), self.sent)
        self.sent += 1
        self.bytes_sent += t.numel() * t.element_size()
        return handoff

    def recv(self, h: Handoff) -> torch.Tensor:
        if h.seq != self.received:
            raise StageFailedError(
                f"stage {self.rank}: expected transfer #{self.received} from stage "
                f"{self.rank - 1}, "
                f"got #{h.seq}; the link lost a message"
            )
        t = torch.empty(h.shape, dtype=getattr(torch, h.dtype), device=self.device)
        dist.recv(t, src=self.rank - 1)
        self.received += 1
        return t

    def close(self) -> None:
        """Leave the group. With sends still pending (the peer died) NCCL's orderly teardown would
        wait for them, so it is aborted instead."""
        if not dist.is_initialized():
            return
        if self.backend == "nccl" and any(not w.is_completed() for w, _ in self.pending):
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        else:
            dist.destroy_process_group()
        self.pending.clear()  # after the teardown: the device may still read these until then
