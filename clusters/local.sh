#!/usr/bin/env bash
# Single node: start Ray, then serve a pipeline layout on it (default: the tiny CPU layout).
#   clusters/local.sh [pipelines/X.yaml]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-pipelines/tiny-cpu.yaml}
ray start --head --port=6379 --dashboard-host=127.0.0.1 --disable-usage-stats
trap 'ray stop' EXIT
jamba-ray serve --config "$CONFIG" --address auto
