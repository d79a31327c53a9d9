"""Ray's console lines that say nothing to act on are dropped, and colour codes stripped (they
end up in log files when the output is redirected). Python logging lines are filtered per logger;
lines Ray's C++ core writes straight to file descriptor 2 need `drop_native_lines`."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's default for a local cluster (a token it made itself), not something to act on.
DROPPED = ("Token authentication is enabled for this Ray cluster",)
RAY_LOGGERS = (
    "ray._private.worker",  # "Started a local Ray instance. View the dashboard at <colours>"
    "ray._private.authentication.authentication_token_setup",
)


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith(DROPPED):
            return False
        record.msg, record.args = ANSI.sub("", text), ()
        return True


_QUIET = _Quiet()


def quiet_ray() -> None:
    """Install the filter on the loggers Ray writes those lines with (before `ray.init`)."""
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)


# Ray Data's pool actors get their (large) constructor arguments through the object store and are
# restartable; Ray's core logs that combination at E level on every `score`. Expected, not an error.
ACTOR_ARGS_NOTICE = ("core_worker.cc", "has constructor arguments in the object store")


@contextlib.contextmanager
def drop_native_lines(markers: tuple[str, ...] = ACTOR_ARGS_NOTICE):
    """Inside, fd 2 goes through a relay that drops whole lines containing every marker; the
    rest pass through in order (Python's stderr too: it writes to fd 2)."""
    sys.stderr.flush()
    console = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    relay = threading.Thread(target=_relay, args=(read, console, markers), daemon=True)
    relay.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # the pipe's last write end closes: the relay reads to the end
        relay.join(timeout=5)
        os.close(console)


def _relay(read: int, console: int, markers: tuple[str, ...]) -> None:
    wanted = [m.encode() for m in markers]
    with open(read, "rb") as pipe:
        for line in pipe:
            if not all(m in line for m in wanted):
                try:
                    os.write(console, line)
                except OSError:  # the console went away: nothing left to show it on
                    return
