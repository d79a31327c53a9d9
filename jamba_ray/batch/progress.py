"""What a running job shows: one progress line every few seconds, and Ray Data kept quiet."""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field


def quiet_ray_data() -> None:
    """No Ray Data progress bars or INFO lines on the console (its log file keeps everything)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; file handlers are not
            handler.setLevel(logging.WARNING)
            handler.addFilter(_not_the_bars_notice)


def _not_the_bars_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


@dataclass(slots=True)
class Counts:
    rows: int = 0
    tokens: int = 0
    errors: int = 0


@dataclass(slots=True)
class Progress:
    """`with Progress(total, every=10): ...` prints a line to stderr every `every` seconds from a
    thread (so it shows while pipelines start and between batches), and one at the end."""

    total: int
    every: float | None = 10.0  # 0: only the last line; None: silent
    counts: Counts = field(default_factory=Counts)
    t0: float = field(default_factory=time.perf_counter)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Progress:
        if self.every:
            threading.Thread(target=self._loop, name="score-progress", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.every is not None:
            self.print()

    def add(self, rows: int, tokens: int, errors: int) -> None:
        c = self.counts
        c.rows, c.tokens, c.errors = c.rows + rows, c.tokens + tokens, c.errors + errors

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.print()

    def line(self) -> str:
        c, wall = self.counts, time.perf_counter() - self.t0
        head = f"jamba-ray score: {c.rows}/{self.total} rows"
        if not c.rows:
            return f"{head}, {wall:.0f} s (starting pipelines)"
        rate = c.rows / wall
        left = (self.total - c.rows) / rate if rate else 0.0
        return (
            f"{head} ({100 * c.rows / max(self.total, 1):.0f}%), {c.tokens} tokens, "
            f"{c.errors} errors, {wall:.0f} s, {rate:.1f} rows/s, ~{left:.0f} s left"
        )

    def print(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
