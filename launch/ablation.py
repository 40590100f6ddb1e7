#!/usr/bin/env python
"""relalign ablation entry point: `python launch/ablation.py [--config X.yaml] [--variants none,singular,...]
[--seeds N | --seed-list 0,1,2] [--quick] [--out DIR] [--deepspeed_config ds.json] [--set key=value ...]`.
Run with --help for the details."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # runnable from a plain checkout too

from pipeline.ablation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
