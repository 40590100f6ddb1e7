#!/usr/bin/env bash
# Lint (flake8 with setup.cfg's settings), then the test suite, inside the project's virtual environment
# (created on first use). Extra arguments go to pytest. The tests run on two pytest-xdist workers (most of them
# wait on subprocesses; -n 0 runs them in this process); a file whose tests share one expensive module fixture
# keeps them on one worker (xdist_group).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
python -m flake8 pipeline models launch bench tests
echo "[lint] flake8 clean"
exec python -m pytest -n 2 --dist loadgroup "$@"
