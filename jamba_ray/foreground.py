"""A server in the foreground: Ctrl-C and SIGTERM stop it the same way, Serve first, then Ray.

`timeout`, systemd and Kubernetes signal a whole process group, and a local Ray's processes
(GCS, raylet, the Serve controller) are in the group of the process that started them: killed
under the driver, they print errors and leave its shutdown waiting for them. So `serve` runs the
server in a child process in a session of its own (`run_detached`) and only passes it one
SIGTERM, which it turns into an orderly stop. Both handle SIGINT and SIGTERM whatever the caller
left them as (a script's background job starts with SIGINT ignored).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

# Serve's controller kills itself inside its own graceful_shutdown task; Ray then reports that
# task as failed (and retried) on the driver's stdout. Expected, so not shown.
EXPECTED_NOISE = "ServeController.graceful_shutdown failed"
CHILD_ENV = "JAMBA_RAY_SERVE_CHILD"  # set in the detached child: it serves, it does not detach
STOPS = (signal.SIGINT, signal.SIGTERM)


def is_detached_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


def run_detached(cmd: list[str]) -> int:
    """Run `cmd` in its own session and wait for it; SIGINT or SIGTERM here sends it one SIGTERM.
    Its exit code is ours."""
    child: subprocess.Popen | None = None
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        if not stopping and child is not None:
            child.send_signal(signal.SIGTERM)
        stopping = True

    for sig in STOPS:  # before the child starts, and whatever they were (SIG_IGN included)
        signal.signal(sig, stop)
    env = dict(os.environ, **{CHILD_ENV: "1"})
    child = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    if stopping:
        child.send_signal(signal.SIGTERM)
    code = child.wait()
    # Stopped before its handlers were in place (nothing started yet): a clean stop too.
    return 0 if stopping and code == -signal.SIGTERM else code


def _die_with_parent() -> None:
    """In the child, before exec: if this process is SIGKILLed, the child gets SIGTERM (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (Ray's own SIGTERM handler exits mid-teardown;
    an inherited SIG_IGN for SIGINT would make Ctrl-C do nothing)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in STOPS:
        signal.signal(sig, interrupt)


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def shutdown_quietly(serving: bool = True) -> None:
    """Stop Serve (replicas drain) if this process started it, then disconnect from or stop Ray;
    signals meanwhile wait."""
    import ray
    from ray import serve

    for sig in STOPS:
        signal.signal(sig, signal.SIG_IGN)
    stdout, sys.stdout = sys.stdout, _DropLines(sys.stdout, EXPECTED_NOISE)
    try:
        if serving and ray.is_initialized():  # (else serve.shutdown() would start a Ray)
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
