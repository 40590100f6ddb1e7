#!/usr/bin/env bash
# Start an MLflow tracking server for relalign runs (sqlite metadata + proxied local artifacts).
#
# Usage: launch/mlflow_server.sh [extra `mlflow server` options...]
#   e.g. RELALIGN_MLFLOW_PORT=5001 launch/mlflow_server.sh
#        launch/mlflow_server.sh --allowed-hosts 'mlflow.example.org'   (extra options pass through)
# Environment (defaults in brackets):
#   RELALIGN_MLFLOW_DIR      folder holding mlflow.db and artifacts/   [<repo>/mlflow_server]
#   RELALIGN_MLFLOW_BACKEND  metadata store: a database URI (postgresql://..., mysql://...) [sqlite:///<DIR>/mlflow.db]
#   RELALIGN_MLFLOW_HOST     interface to bind; 0.0.0.0 for other nodes (then also pass --allowed-hosts) [127.0.0.1]
#   RELALIGN_MLFLOW_PORT     port                                      [5000]
#   RELALIGN_MLFLOW_WORKERS  uvicorn worker processes                  [1]
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's background job runner (GenAI features) [false]
# It prints the `export MLFLOW_TRACKING_URI=...` line that points training at it (or use
# `--set tracking.tracking_uri=...`). Bound to 127.0.0.1 unless told otherwise: the server has no authentication.
# The first start creates the sqlite schema (several seconds); stop the server with Ctrl-C.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"

DIR="${RELALIGN_MLFLOW_DIR:-$ROOT/mlflow_server}"
HOST="${RELALIGN_MLFLOW_HOST:-127.0.0.1}"
PORT="${RELALIGN_MLFLOW_PORT:-5000}"
WORKERS="${RELALIGN_MLFLOW_WORKERS:-1}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

mkdir -p "$DIR/artifacts"
DIR="$(cd "$DIR" && pwd)"
BACKEND="${RELALIGN_MLFLOW_BACKEND:-sqlite:///$DIR/mlflow.db}"
case "$HOST" in
    127.0.0.1|localhost|::1) ;;
    *) echo "[mlflow] WARNING: binding $HOST exposes an unauthenticated server to every host that can reach it;" \
            "keep it on a private network (RELALIGN_MLFLOW_HOST=127.0.0.1 for this machine only)" >&2 ;;
esac
echo "[mlflow] metadata $BACKEND, artifacts $DIR/artifacts" >&2
echo "export MLFLOW_TRACKING_URI=http://$HOST:$PORT"
exec python -m mlflow server \
    --backend-store-uri "$BACKEND" \
    --artifacts-destination "$DIR/artifacts" \
    --host "$HOST" --port "$PORT" --workers "$WORKERS" "$@"
