"""What each stage exported for recovery, held by the driver until a successor imports it."""

from __future__ import annotations

from ..engine.messages import StepMessage


class Snapshot:
    """One stage's exported checkpoints and KV blocks: the latest landed export of each id, held
    as object refs this process owns (in the object store, spilled to disk under pressure)."""

    def __init__(self):
        self.ckpts: dict[int, object] = {}
        self.blocks: dict[int, object] = {}

    def keep(self, msg: StepMessage, refs: list) -> None:
        n = len(msg.export_ckpts)
        self.ckpts.update(zip(msg.export_ckpts, refs[:n]))
        self.blocks.update(zip(msg.export_blocks, refs[n:]))

    def keep_only(self, ckpts: set[int], blocks: set[int]) -> bool:
        """Drop every entry but these; False if one of these is missing."""
        self.ckpts = {c: r for c, r in self.ckpts.items() if c in ckpts}
        self.blocks = {b: r for b, r in self.blocks.items() if b in blocks}
        return len(self.ckpts) == len(ckpts) and len(self.blocks) == len(blocks)

    def size(self) -> tuple[int, int]:
        return len(self.ckpts), len(self.blocks)

    def batches(self, per_call: int = 512):
        """(checkpoint ids, block ids, their refs) in bounded calls."""
        ckpts, blocks = list(self.ckpts.items()), list(self.blocks.items())
        for i in range(0, max(len(ckpts), len(blocks)), per_call):
            c, b = ckpts[i : i + per_call], blocks[i : i + per_call]
            yield [k for k, _ in c], [k for k, _ in b], [r for _, r in c] + [r for _, r in b]
