"""`jamba-ray serve` as an operator runs it: the real CLI in a subprocess, in a process group of its
own (as a shell job, `timeout`, systemd or Kubernetes start it), with its own local Ray.

One server is started for the module: its gRPC port listens on loopback only, a second `serve` on
either of its ports is refused before anything starts, and SIGTERM to its whole process group
stops it cleanly. Starts that cannot succeed fail before Ray starts, naming why."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.serve.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
READY = "jamba-ray: serving on"
STOP_WITHIN_S = 15  # the goal for a stop by SIGTERM / SIGINT
# What must never be printed by a clean stop: Python tracebacks, Ray's E-level C++ log lines and
# its fatal-signal dumps, Serve controller / GCS errors.
ERROR_MARKS = ("Traceback", "ERROR", "Error:", " E ", "SIGTERM received", "failed")


def jamba_ray(*args: str) -> list[str]:
    return [sys.executable, "-m", "jamba_ray", *args]


def own_ray_env() -> dict[str, str]:
    """The environment, less any RAY_ADDRESS: each server starts a local Ray of its own."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        jamba_ray(*args),
        cwd=ROOT,
        env=own_ray_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if any(m in ln for m in ERROR_MARKS)]


class Server:
    def __init__(self, tmp: Path, http_port: int, grpc_port: int):
        self.http_port, self.grpc_port = http_port, grpc_port
        self.log = tmp / "serve.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                jamba_ray("serve", "--port", str(http_port), "--grpc-port", str(grpc_port)),
                cwd=ROOT,
                env=own_ray_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a shell job's
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout: float = 420) -> None:
        deadline = time.time() + timeout
        while READY not in self.output():
            assert self.proc.poll() is None, f"serve exited:\n{self.output()}"
            assert time.time() < deadline, f"serve not ready in {timeout}s:\n{self.output()}"
            time.sleep(1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-cli"), free_port(), free_port())
    try:
        s.wait_ready()
        yield s
    finally:
        s.kill()


def listening_addresses(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the sockets in LISTEN state on `port` (Linux /proc/net/tcp{,6})."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(addr)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            found.append(getattr(ip, "ipv4_mapped", None) or ip)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc/net")
def test_both_ports_listen_on_loopback_only(server):
    for port in (server.http_port, server.grpc_port):
        addrs = listening_addresses(port)
        assert addrs and all(a.is_loopback for a in addrs), f"port {port} listens on {addrs}"


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_a_second_serve_on_a_busy_port_is_refused_before_anything_starts(server, flag):
    busy = server.http_port if flag == "--port" else server.grpc_port
    other = free_port()
    ports = (
        {"--port": busy, "--grpc-port": other}
        if flag == "--port"
        else {
            "--port": other,
            "--grpc-port": busy,
        }
    )
    r = run_cli("serve", *(x for kv in ports.items() for x in (kv[0], str(kv[1]))))
    assert r.returncode == 2, r.stderr
    assert f"port {busy} on 127.0.0.1 is already in use" in r.stderr and flag in r.stderr
    assert "Ray" not in r.stdout + r.stderr  # refused before Ray started


def test_the_console_says_only_what_matters(server):
    out = server.output()
    assert "Token authentication is enabled" not in out  # Ray's default, nothing to act on
    assert "\x1b[" not in out  # no colour codes: this is a log file
    assert "Writing model shards" not in out  # the tiny default's build, no progress bar


def test_sigterm_to_the_process_group_stops_it_cleanly(server):
    os.killpg(server.proc.pid, signal.SIGTERM)  # what timeout / systemd / Kubernetes send
    code = server.proc.wait(timeout=STOP_WITHIN_S)
    out = server.output()
    assert code == 0, out
    assert "jamba-ray: stopping" in out
    assert error_lines(out) == [], out


def test_a_missing_model_fails_before_ray_starts():
    r = run_cli("serve", "--model", "/no/such/model", "--port", str(free_port()), "--no-grpc")
    assert r.returncode == 2
    assert "model '/no/such/model': no such checkpoint directory" in r.stderr
    assert "Ray" not in r.stdout + r.stderr


def test_a_layout_the_machine_cannot_hold_fails_naming_the_shortfall(tmp_path):
    layout = tmp_path / "huge.yaml"
    layout.write_text(
        "name: huge\nengine:\n  placement:\n    num_stages: 2\n    num_cpus_per_stage: 4096\n"
    )
    r = run_cli("serve", "--config", str(layout), "--port", str(free_port()), "--no-grpc")
    assert r.returncode == 2
    assert "2 stage(s) need 8192.5 CPU (4096 per stage, 0.5 for the replica)" in r.stderr
    assert "Use fewer stages" in r.stderr


def test_a_server_started_with_sigint_ignored_stops_on_sigint(tmp_path):
    """A script's background job inherits SIGINT ignored; the foreground wrapper still stops its
    child on SIGINT (here the child is a stand-in: the wrapper is the same for `serve`)."""
    child = textwrap.dedent(
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    wrapper = textwrap.dedent(
        f"""
        import signal, sys
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `cmd &` in a script leaves it
        from jamba_ray.foreground import run_detached
        sys.exit(run_detached([sys.executable, "-c", {child!r}]))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=STOP_WITHIN_S) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
