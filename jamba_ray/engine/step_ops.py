"""What one step does to the stages' state, collected in one place and sealed into its message.

The KV cache is the only writer: block copies, forks, checkpoint saves, exports and forgotten
sequences accumulate here while a micro-batch is built, and `seal()` freezes them for the
`StepMessage` (and the engine's bookkeeping once it lands), leaving the builder empty. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import Fork
from .prefix import Checkpoint


@dataclass(frozen=True, slots=True)
class SavedCheckpoint:
    seq_id: int
    request_id: str
    index: int  # which sample of the request
    ckpt: int
    length: int


@dataclass(frozen=True, slots=True)
class StateOps:
    """One message's state operations (applied by every stage before its segments run) and what
    the engine does once it lands."""

    copies: tuple[tuple[int, int], ...] = ()  # (src block, dst block): copy-on-write tails
    forks: tuple[Fork, ...] = ()
    saves: tuple[tuple[int, int], ...] = ()  # (slot, checkpoint)
    export_ckpts: tuple[int, ...] = ()
    export_blocks: tuple[int, ...] = ()
    forgotten: tuple[int, ...] = ()  # sequence ids the stages drop
    superseded: tuple[Checkpoint, ...] = ()  # snapshots dropped once this message lands
    saved: tuple[SavedCheckpoint, ...] = ()  # keep prompt logprobs beside them once landed

    def message_fields(self) -> dict:
        """The part that travels in the StepMessage."""
        return dict(
            copies=self.copies,
            forks=self.forks,
            saves=self.saves,
            export_ckpts=self.export_ckpts,
            export_blocks=self.export_blocks,
            finished=self.forgotten,
        )


@dataclass(slots=True)
class StepOpsBuilder:
    exports_ckpts: bool = False  # recovery snapshots: each save is exported too (with it)
    copies: list[tuple[int, int]] = field(default_factory=list)
    forks: list[Fork] = field(default_factory=list)
    saves: list[tuple[int, int]] = field(default_factory=list)
    export_ckpts: list[int] = field(default_factory=list)  # emitted ones that landed
    export_blocks: list[int] = field(default_factory=list)
    forgotten: list[int] = field(default_factory=list)
    superseded: list[Checkpoint] = field(default_factory=list)
    saved: list[SavedCheckpoint] = field(default_factory=list)

    def seal(self) -> StateOps:
        saved = [c for _, c in self.saves] if self.exports_ckpts else []
        ckpts = tuple(dict.fromkeys(self.export_ckpts + saved))
        ops = StateOps(
            tuple(self.copies),
            tuple(self.forks),
            tuple(self.saves),
            ckpts,
            tuple(dict.fromkeys(self.export_blocks)),  # (one tail block may hold several)
            tuple(self.forgotten),
            tuple(self.superseded),
            tuple(self.saved),
        )
        self.reset()
        return ops

    def reset(self) -> None:
        self.copies, self.forks, self.forgotten = [], [], []
        self.drop_checkpoints()

    def drop_checkpoints(self) -> None:
        """Pending saves and exports go (what they would make is not trusted); copies, forks
        and forgotten ids stay: live sequences and the stages still need them."""
        self.saves, self.export_blocks, self.superseded, self.saved = [], [], [], []
        self.export_ckpts = []

    def pending_ckpts(self) -> set[int]:
        return {c for _, c in self.saves} | set(self.export_ckpts)
