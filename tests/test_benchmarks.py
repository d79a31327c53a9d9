"""The benchmark scripts that are meant for other machines still run (their CPU smoke modes)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_check_smoke_run_prints_its_table(tmp_path):
    """gpu_check.py on the CPU with a small stage: every check runs, incl. the decode-graphs
    path."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--cpu-smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "decode_graphs vs eager, bf16" in table and "graph steps 12" in table
    assert "batch 64, decode_graphs" in table and "hop of [2048, 4096]" in table
    assert "equal to CPU: True" in table and "reproducible: True" in table
