#!/usr/bin/env bash
# Single node: start a Ray head, serve a pipeline layout on it (default: the tiny CPU layout), and on
# exit (the server's own, Ctrl-C or SIGTERM) stop that head only: other Ray instances on the
# machine are left alone, as `ray stop` would not.
#   clusters/local.sh [pipelines/X.yaml] [jamba-ray serve flags, e.g. --port 8001 --no-grpc]
# Environment: RAY_HEAD_HOST (default 127.0.0.1) is where the dashboard and Serve's HTTP/gRPC
# listen; 0.0.0.0 opens them to the network. Ray's own ports (GCS, raylet) always listen on every
# interface (Ray advertises the node's address, never loopback) behind Ray's token authentication.
# RAY_HEAD_PORT (default 6379) is the GCS port.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-pipelines/tiny-cpu.yaml}
shift || true
HOST=${RAY_HEAD_HOST:-127.0.0.1}
# Token authentication for the head and the server alike (the token is ~/.ray/auth_token).
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
PORT=${RAY_HEAD_PORT:-6379}
# This head's session files and address file live here, apart from any other Ray's.
TEMP=$(mktemp -d /tmp/jamba-ray-head.XXXXXX)

# --block: this process owns the head's Ray processes and stops them all on SIGTERM.
ray start --head --block --disable-usage-stats --temp-dir="$TEMP" --port="$PORT" \
  --dashboard-host="$HOST" &
HEAD=$!
SERVE=
stop() {
  set +e
  if [ -n "$SERVE" ]; then kill -TERM "$SERVE" 2>/dev/null; wait "$SERVE" 2>/dev/null; fi
  kill -TERM "$HEAD" 2>/dev/null
  wait "$HEAD" 2>/dev/null
  rm -rf "$TEMP"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

until [ -s "$TEMP/ray_current_cluster" ]; do
  kill -0 "$HEAD" 2>/dev/null || { echo "local.sh: the Ray head did not start" >&2; exit 1; }
  sleep 1
done
ADDRESS=$(cat "$TEMP/ray_current_cluster")
echo "local.sh: Ray head at $ADDRESS (pid $HEAD, dashboard http://$HOST:8265); serving $CONFIG"
# In the background so that a signal to this script reaches the trap at once; jamba-ray serve
# drains and exits 0 on SIGTERM.
jamba-ray serve --config "$CONFIG" --address "$ADDRESS" --host "$HOST" "$@" &
SERVE=$!
wait "$SERVE"
