"""Bounded load/soak test against a jamba-ray server on loopback (stops by itself).

    python benchmarks/soak.py [--url http://127.0.0.1:8000] [--clients 8] [--seconds 300]

Without --url it starts the tiny default pipeline on a free loopback port first. N client threads
mix streaming, non-streaming, aborted (closed mid-stream) and bad requests for T seconds, then it
reports requests ok/failed, latency p50/p99, peak RSS per process, and slots in use at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import requests

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class SoakReport:
    seconds: float
    clients: int
    outcomes: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    slots_in_use_end: int = -1

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] if xs else float("nan")

    def table(self) -> str:
        ok = sum(v for k, v in self.outcomes.items() if not k.startswith("unexpected"))
        lines = [
            f"soak: {self.clients} clients x {self.seconds:.0f} s",
            "| metric | value |",
            "|---|---:|",
            f"| requests ok (incl. expected 4xx, aborts) | {ok} |",
            f"| unexpected failures | {len(self.unexpected)} |",
        ]
        lines += [f"| {k} | {v} |" for k, v in sorted(self.outcomes.items())]
        lines += [
            f"| latency p50 / p99 (s) | {self.pct(0.5):.2f} / {self.pct(0.99):.2f} |",
            f"| slots in use at end | {self.slots_in_use_end} |",
        ]
        lines += [
            f"| peak RSS {name} (MiB) | {rss:.0f} |"
            for name, rss in sorted(self.peak_rss_mib.items())
        ]
        return "\n".join(lines)


def _check_loopback(url: str) -> None:
    if urlparse(url).hostname not in LOOPBACK:
        raise SystemExit(f"soak only targets loopback addresses, not {url}")


def _one(
    base: str, model: str, rng: random.Random, report: SoakReport, lock: threading.Lock
) -> None:
    kind = rng.choice(["unary", "stream", "abort", "bad", "chat"])
    body = {
        "model": model,
        "prompt": rng.choice(["hello", "The quick brown fox", "café 東京"]),
        "max_tokens": rng.randint(1, 24),
        "temperature": rng.choice([0.0, 0.8]),
    }
    t0 = time.perf_counter()
    try:
        if kind == "bad":
            bad = rng.choice(
                [{"max_tokens": -1}, {"temperature": -2}, {"top_p": 7}, {"prompt": ""}, {"n": 0}]
            )
            r = requests.post(f"{base}/v1/completions", json={**body, **bad}, timeout=120)
            outcome = "bad->400" if r.status_code == 400 else f"unexpected {r.status_code}"
        elif kind == "chat":
            r = requests.post(
                f"{base}/v1/chat/completions",
                timeout=120,
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 8,
                },
            )
            outcome = (
                "chat ok"
                if r.ok
                else ("overloaded 429" if r.status_code == 429 else f"unexpected {r.status_code}")
            )
        elif kind == "unary":
            r = requests.post(f"{base}/v1/completions", json=body, timeout=120)
            outcome = (
                "unary ok"
                if r.ok
                else ("overloaded 429" if r.status_code == 429 else f"unexpected {r.status_code}")
            )
        else:
            with requests.post(
                f"{base}/v1/completions", json={**body, "stream": True}, stream=True, timeout=120
            ) as r:
                if r.status_code == 429:
                    outcome = "overloaded 429"
                elif not r.ok:
                    outcome = f"unexpected {r.status_code}"
                else:
                    stop_after = rng.randint(1, 4) if kind == "abort" else None
                    n, done = 0, False
                    for line in r.iter_lines():
                        if not line:
                            continue
                        n += 1
                        done = line == b"data: [DONE]"
                        if b'"error"' in line:
                            raise RuntimeError(line.decode()[:200])
                        if stop_after and n >= stop_after:
                            break
                    outcome = (
                        "aborted mid-stream"
                        if stop_after and not done
                        else ("stream ok" if done else "unexpected truncated stream")
                    )
    except Exception as e:  # connection errors etc. are unexpected
        outcome = f"unexpected {type(e).__name__}: {e}"[:120]
    with lock:
        report.outcomes[outcome.split(":")[0]] += 1
        if outcome.startswith("unexpected"):
            report.unexpected.append(outcome)
        else:
            report.latencies.append(time.perf_counter() - t0)


def _rss_sampler(report: SoakReport, stop: threading.Event) -> None:
    import psutil

    while not stop.is_set():
        for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                name = next(
                    (
                        k
                        for k in (
                            "Stage",
                            "ServeReplica",
                            "ProxyActor",
                            "ServeController",
                            "raylet",
                            "gcs_server",
                        )
                        if k in cmd or k in (p.info["name"] or "")
                    ),
                    None,
                )
                if name:
                    rss = p.info["memory_info"].rss / 2**20
                    report.peak_rss_mib[name] = max(report.peak_rss_mib.get(name, 0.0), rss)
            except (psutil.Error, TypeError):
                continue
        stop.wait(1.0)


def run_soak(
    base: str, model: str, clients: int = 8, seconds: float = 60, seed: int = 0
) -> SoakReport:
    _check_loopback(base)
    report, lock, stop = SoakReport(seconds, clients), threading.Lock(), threading.Event()
    deadline = time.time() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.time() < deadline:
            _one(base, model, rng, report, lock)

    sampler = threading.Thread(target=_rss_sampler, args=(report, stop), daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    report.slots_in_use_end = _idle_slots(base)
    return report


def _idle_slots(base: str, timeout: float = 60) -> int:
    """Slots in use once the server has drained (aborted streams land within a step or two)."""
    end = time.time() + timeout
    while True:
        s = requests.get(f"{base}/v1/stats", timeout=30).json()
        if s["slots_in_use"] == 0 or time.time() > end:
            return s["slots_in_use"]
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default=None)
    ap.add_argument("--model", default="jamba-tiny")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    url = a.url
    if url is None:
        import socket

        import ray

        from jamba_ray.config.pipeline_file import PipelineFile
        from jamba_ray.serve.launch import start

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(include_dashboard=False, log_to_driver=False)
        pipeline = PipelineFile.default()
        pipeline = pipeline.model_copy(
            update={"serve": pipeline.serve.model_copy(update={"port": port, "grpc_port": None})}
        )
        start(pipeline.to_config())
        url = f"http://127.0.0.1:{port}"
    report = run_soak(url, a.model, a.clients, a.seconds)
    print(json.dumps(report.__dict__, default=list, indent=1) if a.json else report.table())


if __name__ == "__main__":
    main()
