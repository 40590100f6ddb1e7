#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install what it needs.
# Sourced by launch/quickstart.sh and launch/test.sh; safe to run again (a stamp skips
# the install when setup.cfg has not changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RELALIGN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.relalign-installed"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[env] installing dependencies into $VENV (first time: several minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    # torch first: DeepSpeed's setup.py imports torch, so it is built without isolation.
    "$VENV/bin/python" -m pip install -q --upgrade-strategy only-if-needed torch torchvision
    "$VENV/bin/python" -m pip install -q --no-build-isolation deepspeed
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
# JIT-built DeepSpeed ops (the CPU shm comm op) are cached here between runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
