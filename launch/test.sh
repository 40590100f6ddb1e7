#!/usr/bin/env bash
# Run the test suite inside the project's virtual environment (created on first use).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
