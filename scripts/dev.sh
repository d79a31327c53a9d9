#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (CPU torch first), then runs the job.
#   scripts/dev.sh serve   serve the built-in tiny Jamba over HTTP (OpenAI API) on 127.0.0.1:8000
#   scripts/dev.sh test    lint + the whole test suite (what .ci/run calls)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

setup() {
  if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
  . .venv/bin/activate
  # The CPU build of torch must come first: an unpinned torch would pull a multi-GB CUDA build.
  python -c "import torch" 2>/dev/null || pip install -q --disable-pip-version-check "torch==2.13.0"
  pip install -q --disable-pip-version-check -e ".[test]"
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
