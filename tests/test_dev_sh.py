"""scripts/dev.sh installs what it needs once: torch (from the index or wheel the environment
names), then the package, again only when pyproject.toml changes. Run against a copy of the
script whose .venv holds stand-ins for python, pip and jamba-ray that log their calls."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/bin/bash
if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then [ -f "$VENV/torch" ]; exit $?; fi
exec {python} "$@"
"""
FAKE_PIP = """#!/bin/bash
echo "pip $*" >> "$VENV/calls"
case "$*" in *torch*) touch "$VENV/torch" ;; esac
"""
FAKE_CLI = """#!/bin/bash
echo "jamba-ray $*" >> "$VENV/calls"
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "dev.sh", tmp_path / "scripts" / "dev.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export VENV={venv} PATH="{venv}/bin:$PATH"\n')
    for name, text in (
        ("python", FAKE_PYTHON.format(python=sys.executable)),
        ("pip", FAKE_PIP),
        ("jamba-ray", FAKE_CLI),
    ):
        path = venv / "bin" / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def dev_sh(checkout: Path, *args: str, **env: str) -> list[str]:
    """Run dev.sh; the calls its stand-ins logged during this run."""
    calls = checkout / ".venv" / "calls"
    before = calls.read_text().splitlines() if calls.exists() else []
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JAMBA_RAY_TORCH")}
    subprocess.run(
        ["bash", str(checkout / "scripts" / "dev.sh"), *args],
        env={**environ, **env},
        check=True,
        capture_output=True,
        timeout=60,
    )
    return calls.read_text().splitlines()[len(before) :]


def test_serve_installs_once_and_again_only_when_pyproject_changes(checkout):
    first = dev_sh(checkout, "serve", "--port", "8123")
    assert first == [
        "pip install -q --disable-pip-version-check torch==2.13.0",
        "pip install -q --disable-pip-version-check -e .[test]",
        "jamba-ray serve --port 8123",
    ]
    assert dev_sh(checkout, "serve") == ["jamba-ray serve"]
    with open(checkout / "pyproject.toml", "a") as f:
        f.write("\n# a change\n")
    assert dev_sh(checkout, "serve") == [
        "pip install -q --disable-pip-version-check -e .[test]",
        "jamba-ray serve",
    ]


def test_torch_comes_from_the_index_or_wheel_the_environment_names(checkout):
    url = "https://download.pytorch.org/whl/cpu"
    calls = dev_sh(checkout, "generate", JAMBA_RAY_TORCH_INDEX=url)
    assert calls[0] == f"pip install -q --disable-pip-version-check --index-url {url} torch==2.13.0"
    (checkout / ".venv" / "torch").unlink()
    calls = dev_sh(checkout, "generate", JAMBA_RAY_TORCH_WHEEL="/w/torch-2.13.0+cpu.whl")
    assert calls == [
        "pip install -q --disable-pip-version-check /w/torch-2.13.0+cpu.whl",
        "jamba-ray generate --prompt Hello, Jamba --max-tokens 16",
    ]
