"""Stage-to-stage hop cost: hidden states through Ray's object store vs point-to-point
(runtime/transport.py).

    python benchmarks/hop.py [--device cpu|cuda] [--hidden 4096] [--iters 50] [--json]

Two actors stand in for adjacent stages and use the stages' own code paths: `wire.pack/unpack` for
the object store, `PeerLink` (gloo on CPU, NCCL on GPU: needs 2 GPUs) for p2p. Each hop is one
`make` task on the sender chained into one `take` task on the receiver, as in the pipeline; the
`control only` column is the same chain carrying nothing, i.e. Ray's share of every hop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = (1, 8, 64, 512, 2048)  # decode batches, then prefill chunks


class Peer:
    def __init__(self, rank: int, device: str):
        import torch

        self.rank, self.device, self.cache = rank, device, {}
        if device == "cuda":
            torch.cuda.set_device(0)

    def address(self) -> str:
        from ray.util import get_node_ip_address

        from jamba_ray.runtime.transport import free_address

        return free_address(get_node_ip_address())

    def join(self, address: str) -> None:
        from jamba_ray.runtime.transport import PeerLink

        self.link = PeerLink(self.rank, 2, address, self.device)

    def make(self, rows: int, hidden: int, mode: str):
        import torch

        from jamba_ray.runtime.wire import pack

        if mode == "control":
            return None
        key = (rows, hidden)
        if key not in self.cache:
            self.cache[key] = torch.randn(rows, hidden, device=self.device).to(torch.bfloat16)
        t = self.cache[key]
        if mode == "p2p":
            return self.link.send(t)
        return pack(t.cpu())  # what a GPU stage does on the object-store path

    def take(self, x, mode: str) -> int:
        import torch

        from jamba_ray.runtime.wire import unpack

        if mode == "control":
            return 0
        t = self.link.recv(x) if mode == "p2p" else unpack(x).to(self.device)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return t.numel()


def measure(a, b, rows: int, hidden: int, mode: str, iters: int) -> float:
    import ray

    for _ in range(3):
        ray.get(b.take.remote(a.make.remote(rows, hidden, mode), mode))
    t0 = time.perf_counter()
    for _ in range(iters):
        ray.get(b.take.remote(a.make.remote(rows, hidden, mode), mode))
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--hidden", type=int, default=4096, help="Jamba-v0.1's hidden size")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    gpus = 1 if a.device == "cuda" else 0
    if gpus and ray.cluster_resources().get("GPU", 0) < 2:
        raise SystemExit(
            "--device cuda needs 2 GPUs: NCCL does not connect two ranks on one device"
        )
    actor = ray.remote(num_cpus=0.5, num_gpus=gpus)(Peer)
    a_, b_ = actor.remote(0, a.device), actor.remote(1, a.device)
    address = ray.get(a_.address.remote())
    ray.get([a_.join.remote(address), b_.join.remote(address)])
    r = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {a.device}",
        "hidden": a.hidden,
        "rows": {},
    }
    try:
        for rows in ROWS:
            r["rows"][rows] = {
                m: measure(a_, b_, rows, a.hidden, m, a.iters)
                for m in ("control", "object_store", "p2p")
            }
    finally:
        ray.shutdown()
    if a.json:
        print(json.dumps(r, indent=1))
        return
    backend = "NCCL" if a.device == "cuda" else "gloo"
    print(f"hop cost, [rows, {a.hidden}] bf16 hidden states between two actors; {r['machine']}\n")
    print(
        f"| rows | MiB | control only (ms) | object store (ms) | p2p {backend} (ms) "
        "| data part: store / p2p (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for rows, m in r["rows"].items():
        mib = rows * a.hidden * 2 / 2**20
        print(
            f"| {rows} | {mib:.2f} | {m['control']:.3f} | {m['object_store']:.3f} | "
            f"{m['p2p']:.3f} | {m['object_store'] - m['control']:.3f} / "
            f"{m['p2p'] - m['control']:.3f} |"
        )


if __name__ == "__main__":
    main()
