"""Slot handles for per-sequence state. Pure Python: every stage holds the same slot numbering."""

from __future__ import annotations


class SlotAllocator:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError("a state pool needs at least one slot")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low numbers first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocated(self) -> set[int]:
        return set(range(self.num_slots)) - set(self._free)

    def can_allocate(self, n: int = 1) -> bool:
        return len(self._free) >= n

    def allocate(self, n: int = 1) -> list[int]:
        if not self.can_allocate(n):
            raise RuntimeError(f"asked for {n} slots, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, slots: list[int]) -> None:
        for s in slots:
            if not 0 <= s < self.num_slots or s in self._free:
                raise RuntimeError(f"slot {s} freed twice or never allocated")
            self._free.append(s)
