"""Ray's console lines that say nothing to act on are dropped, and colour codes stripped (they
end up in log files when the output is redirected)."""

from __future__ import annotations

import logging
import re

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
