#!/usr/bin/env bash
# The main job on the embedded default data (synthetic relational scenes, tiny model):
# creates/reuses .venv, then runs the pretraining stage (cached) and retrieval fine-tuning with IAIS under the
# DeepSpeed launcher.
# Extra arguments are passed to launch/finetune.py (e.g. --set train.steps=200).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/env.sh"
cd "$ROOT"
exec deepspeed launch/finetune.py --deepspeed_config ds_configs/zero2.json "$@"
