#!/usr/bin/env python
"""relalign finetune entry point: `deepspeed launch/finetune.py --deepspeed_config ds_configs/zero2.json
[--config X.yaml]
[--set key=value ...]`. Run with --help for every option and config key."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # runnable from a plain checkout too

from pipeline.shutdown import skip_final_collection  # noqa: E402  (standard library only)
from pipeline.stopping import install_signal_handler  # noqa: E402  (standard library only)

install_signal_handler()   # before the heavy imports: Slurm's warning signal may arrive during them
skip_final_collection()

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("finetune"))
