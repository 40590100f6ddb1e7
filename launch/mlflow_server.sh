#!/usr/bin/env bash
# Start an MLflow tracking server for relalign runs (sqlite metadata + proxied local artifacts).
#
# Usage: launch/mlflow_server.sh [extra `mlflow server` options...]
#   e.g. RELALIGN_MLFLOW_PORT=5001 launch/mlflow_server.sh
#        launch/mlflow_server.sh --allowed-hosts 'mlflow.example.org'   (extra options pass through)
# Environment (defaults in brackets):
#   RELALIGN_MLFLOW_DIR      folder holding mlflow.db and artifacts/   [<repo>/mlflow_server]
#   RELALIGN_MLFLOW_HOST     interface to bind; 0.0.0.0 for other nodes (then also pass --allowed-hosts) [127.0.0.1]
#   RELALIGN_MLFLOW_PORT     port                                      [5000]
#   RELALIGN_MLFLOW_WORKERS  uvicorn worker processes                  [1]
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's background job runner (GenAI features) [false]
# Point training at it with `MLFLOW_TRACKING_URI=http://HOST:PORT` or `--set tracking.tracking_uri=...`.
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
echo "[mlflow] store $DIR; tracking URI http://$HOST:$PORT" >&2
exec python -m mlflow server \
    --backend-store-uri "sqlite:///$DIR/mlflow.db" \
    --artifacts-destination "$DIR/artifacts" \
    --host "$HOST" --port "$PORT" --workers "$WORKERS" "$@"
