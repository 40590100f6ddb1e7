"""The pretraining stage of a fine-tuning config (``model.pretrain_config``) alone, as its own DeepSpeed job:

    deepspeed --module pipeline.ablation.pretrain_stage --deepspeed_config DS.json --config FT.yaml [--set k=v ...]

It runs pipeline.train.stages.ensure_pretrained, the code every fine-tune runs first: it pretrains only when the
stamped export is missing or was made with another pretraining config, so each variant's fine-tune then finds
it cached. Exit codes as launch/finetune.py: 0, 2 bad input, 1."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from pipeline.errors import UserError, exit_code_of


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ablation.pretrain_stage",
                                     description="pretrain model.pretrain_config of a fine-tuning config, once")
    parser.add_argument("--config", required=True, help="the fine-tuning experiment YAML")
    parser.add_argument("--deepspeed_config", required=True, help="the fine-tunes' DeepSpeed JSON")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    return parser


def pretrain_stage(config: str, sets: list[str], ds_path: str) -> int:
    from pipeline import lost_ranks
    from pipeline.config import load_config
    from pipeline.train.stages import ensure_pretrained
    cfg = load_config(config, sets)
    if not cfg.model.pretrain_config:
        raise UserError(f"config {config}: model.pretrain_config is not set; there is no pretraining stage")
    with lost_ranks.reported(load_config(cfg.model.pretrain_config).run_dir):
        ensure_pretrained(cfg, ds_path)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return exit_code_of(lambda: pretrain_stage(args.config, list(args.sets), args.deepspeed_config))


if __name__ == "__main__":
    sys.exit(main())
