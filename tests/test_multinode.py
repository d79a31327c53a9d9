"""A real two-node Ray cluster on this machine: stages land on different nodes, tokens stay
exact."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import psutil

from tests.conftest import PROMPTS, assert_greedy_like_hf

DRIVER = r"""
import json, sys, ray
from jamba_ray import LLM, SamplingParams
ray.init(address=sys.argv[2])
llm = LLM(sys.argv[1], num_stages=2, num_cpus_per_stage=0.5, strategy="STRICT_SPREAD",
          resources=(("stage_host", 1.0),), max_num_seqs=4)
outs = llm.generate(json.loads(sys.argv[3]),
                    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
nodes = [i["node_id"] for i in llm.engine.pipeline.info]
print(json.dumps({"nodes": nodes, "tokens": [o.outputs[0].token_ids for o in outs]}))
llm.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_cluster(*marks: str) -> None:
    """Stop only this test's cluster (`ray stop` would also stop the session's): every process whose
    command line names its temp dir or GCS port."""
    doomed = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(m in " ".join(p.info["cmdline"] or []) for m in marks):
                doomed += [p, *p.children(recursive=True)]  # agents renamed themselves "ray::..."
        except psutil.Error:
            continue
    for p in doomed:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_strict_spread_puts_stages_on_two_nodes_and_stays_token_exact(tiny_ckpt):
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Unix socket paths are limited
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    common = [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        '--resources={"stage_host": 1}',
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(
            [
                "ray",
                "start",
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--temp-dir={temp_dir}",
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run(
            ["ray", "start", f"--address={address}", *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, tiny_ckpt, address, json.dumps(PROMPTS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        kill_cluster(temp_dir, f":{port} ", f":{port}\n", f"address={address}")
    assert len(set(result["nodes"])) == 2, result["nodes"]
    for prompt, tokens in zip(PROMPTS, result["tokens"]):
        assert_greedy_like_hf(tiny_ckpt, prompt, tokens)
