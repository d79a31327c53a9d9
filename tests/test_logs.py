"""Ray's lines with nothing to act on stay off the console; everything else passes unchanged."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

from jamba_ray.logs import RAY_LOGGERS, quiet_ray

ROOT = Path(__file__).resolve().parents[1]


def test_ray_token_auth_warning_is_dropped_and_colour_codes_stripped(caplog):
    quiet_ray()
    auth, worker = (logging.getLogger(name) for name in reversed(RAY_LOGGERS))
    with caplog.at_level(logging.INFO):
        auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
        worker.info("Started. View the dashboard at %s%s %s", "\x1b[1m", "http://x", "\x1b[22m")
    assert [r.getMessage() for r in caplog.records] == ["Started. View the dashboard at http://x "]


def test_the_core_workers_actor_arguments_notice_is_dropped_from_fd_2():
    """Ray's C++ core writes to fd 2 itself; a subprocess plays it with os.write."""
    program = textwrap.dedent(
        """
        import os, sys
        from jamba_ray.logs import drop_native_lines
        with drop_native_lines():
            os.write(2, b"[2026 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker' "
                        b"has constructor arguments in the object store and max_restarts > 0.\\n")
            os.write(2, b"[2026 E 1 1] core_worker.cc:99: something else\\n")
            print("python stderr", file=sys.stderr)
        print("after", file=sys.stderr)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    assert r.stderr == "[2026 E 1 1] core_worker.cc:99: something else\npython stderr\nafter\n"
