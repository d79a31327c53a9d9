#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (CPU torch first), then runs the job.
#   scripts/dev.sh serve [ARGS]     serve the built-in tiny Jamba (OpenAI API on 127.0.0.1:8000)
#   scripts/dev.sh generate [TEXT]  one greedy generation from the tiny Jamba
#   scripts/dev.sh test [ARGS]      lint + the whole test suite (what .ci/run calls)
# torch is installed once, before the package, as `torch==2.13.0` from pip's configured indexes;
# JAMBA_RAY_TORCH_INDEX=URL takes it from that index instead (https://download.pytorch.org/whl/cpu
# for the CPU build on Linux), JAMBA_RAY_TORCH_WHEEL=PATH_OR_URL installs that wheel.
# The package is installed again only when pyproject.toml changes (.venv/.installed holds its hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=torch==2.13.0

install_torch() {
  local pip=(pip install -q --disable-pip-version-check)
  if [ -n "${JAMBA_RAY_TORCH_WHEEL:-}" ]; then "${pip[@]}" "$JAMBA_RAY_TORCH_WHEEL"
  elif [ -n "${JAMBA_RAY_TORCH_INDEX:-}" ]; then "${pip[@]}" --index-url "$JAMBA_RAY_TORCH_INDEX" "$TORCH"
  else "${pip[@]}" "$TORCH"; fi
}

setup() {
  if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
  . .venv/bin/activate
  python -c "import torch" 2>/dev/null || install_torch
  local want
  want=$(python -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest())")
  if [ "$(cat .venv/.installed 2>/dev/null)" != "$want" ]; then
    pip install -q --disable-pip-version-check -e ".[test]"
    echo "$want" > .venv/.installed
  fi
}

usage() { echo "usage: scripts/dev.sh serve|generate|test [ARGS...]" >&2; exit 2; }
cmd=${1:-test}
case "$cmd" in serve|generate|test) ;; *) usage ;; esac  # before installing anything
shift || true
setup
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
case "$cmd" in
  serve) exec jamba-ray serve "$@" ;;
  generate) exec jamba-ray generate --prompt "${1:-Hello, Jamba}" --max-tokens 16 ;;
  test)
    ruff check jamba_ray tests benchmarks
    exec python -m pytest -q -p no:cacheprovider "$@" ;;
  *) usage ;;
esac
