"""A server in the foreground: Ctrl-C and SIGTERM stop it the same way, Serve first, then Ray."""

from __future__ import annotations

import signal
import sys
import time

# Serve's controller kills itself inside its own graceful_shutdown task; Ray then reports that
# task as failed (and retried) on the driver's stdout. Expected, so not shown.
EXPECTED_NOISE = "ServeController.graceful_shutdown failed"


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does (Ray's own handler exits mid-teardown)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def shutdown_quietly() -> None:
    """Stop Serve (replicas drain), then disconnect from or stop Ray; signals meanwhile wait."""
    import ray
    from ray import serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdout, sys.stdout = sys.stdout, _DropLines(sys.stdout, EXPECTED_NOISE)
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        sys.stdout = stdout


class _DropLines:
    """A text stream that drops the lines containing `marker` (and the newline print adds)."""

    def __init__(self, stream, marker: str):
        self.stream, self.marker, self.dropped = stream, marker, False

    def write(self, text: str) -> int:
        drop = self.marker in text or (self.dropped and text == "\n")
        self.dropped = self.marker in text
        return len(text) if drop else self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)
