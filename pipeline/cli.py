"""Command line shared by launch/pretrain.py and launch/finetune.py."""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Optional

from pipeline.errors import exit_code_of

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = {"finetune": REPO / "launch" / "configs" / "demo_tiny.yaml",
                   "pretrain": REPO / "launch" / "configs" / "pretrain_tiny.yaml"}
DEFAULT_DS = REPO / "ds_configs" / "zero2.json"

LAUNCHER_HELP = """\
How many processes run:
  deepspeed [--num_nodes N] [--num_gpus G] [--hostfile F] launch/{stage}.py ...
  The deepspeed launcher starts one process per "device slot": on GPUs one per visible GPU (or
  --num_gpus G); on a CPU-only machine DeepSpeed's CPU accelerator counts one slot per NUMA node
  (1 on most machines; the LOCAL_SIZE variable overrides it), so `deepspeed launch/{stage}.py` runs ONE
  process here and `deepspeed --num_gpus 2 launch/{stage}.py` runs two (gloo, each with cores/2 torch
  threads unless train.threads is set). Multi-node: a hostfile ("host slots=N" lines) with --hostfile and
  --num_nodes. `torchrun --nproc_per_node N launch/{stage}.py` works too (it sets RANK/WORLD_SIZE/LOCAL_RANK).
  On CPU, relalign skips DeepSpeed's JIT-built shared-memory all-reduce op (40-130 s to compile, rebuilt
  whenever the build environment changes) and lets gloo do the collectives; RELALIGN_SHM_COMM=1 builds
  and uses it (cached in $TORCH_EXTENSIONS_DIR, which launch/env.sh sets to .cache/torch_extensions).

Batch size, gradient accumulation, clipping, optimizer (AdamW) and scheduler come from the DeepSpeed JSON.
Values written "auto" there are filled from the experiment config (train.micro_batch_size, train.grad_accum,
train.lr, train.warmup_steps; scheduler total steps = train.steps); an experiment value of "auto" defers to
the JSON; two different numbers are an error (exit 2). bf16.enabled "auto": bf16 on a GPU that supports it,
fp32 on CPU. optimizer.params.torch_adam true: torch.optim.AdamW (no fused op to compile).

Config keys (--set section.key=value; values are parsed as YAML: numbers, true/false, null, [lists], {{maps}}):
{keys}
Exit codes: 0 done, 2 bad input (one line on stderr: 'error: ...'), 1 anything else."""


def _describe(cls, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.extend(_describe(tp, name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:   # type: ignore[misc]
            default = f.default_factory()                      # type: ignore[misc]
        else:
            default = None
        from pipeline.config import _type_name
        note = f": {f.metadata['help']}" if "help" in f.metadata else ""
        lines.append(f"  {name} ({_type_name(tp)}; default {default!r}){note}")
    return lines


def build_parser(stage: str) -> argparse.ArgumentParser:
    from pipeline.config import ExperimentConfig
    what = ("retrieval fine-tuning with hard negatives and the IAIS regulariser" if stage == "finetune"
            else "pretraining with MLM + ITM + ITC (+ MRFR in region modes)")
    parser = argparse.ArgumentParser(
        prog=f"launch/{stage}.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"relalign {stage}: {what}, on DeepSpeed, logged to MLflow.",
        epilog=LAUNCHER_HELP.format(stage=stage, keys="\n".join(_describe(ExperimentConfig))))
    parser.add_argument("--config", default=None,
                        help=f"experiment YAML (default: the embedded {DEFAULT_CONFIGS[stage].relative_to(REPO)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.steps=200 (repeatable)")
    parser.add_argument("--deepspeed_config", default=None,
                        help=f"DeepSpeed JSON (default: {DEFAULT_DS.relative_to(REPO)}); see ds_configs/")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <run_dir>/checkpoints/latest (same as --set checkpoint.resume=true)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved experiment config and DeepSpeed JSON, then exit")
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK from the environment is used")
    return parser


def main(stage: str, argv: Optional[list[str]] = None) -> int:
    args = build_parser(stage).parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    config = args.config or str(DEFAULT_CONFIGS[stage])
    ds_path = args.deepspeed_config or str(DEFAULT_DS)
    if args.print_config:
        return exit_code_of(lambda: _print_config(stage, config, overrides, ds_path))
    return exit_code_of(lambda: run(stage, config, overrides, ds_path))


def run(stage: str, config_path: str, overrides: list[str], ds_path: str) -> int:
    """Config and DeepSpeed JSON first (a user error ends here with exit 2, before any process-group work),
    then the stage's Python API. A preemption signal (pipeline.stopping) ends the stage early with a
    complete checkpoint; the exit code then says whether the job was requeued."""
    from pipeline import lost_ranks
    from pipeline.stopping import exit_after_stop, process_flag
    from pipeline.train.runtime import prepare
    cfg, ds = prepare(stage, config_path, overrides, ds_path)
    stop = process_flag()
    if stage == "finetune":
        from pipeline.train.finetune import finetune as train_stage
        if cfg.model.pretrain_config:
            from pipeline.config import load_config
            from pipeline.train.stages import ensure_pretrained
            with lost_ranks.reported(load_config(cfg.model.pretrain_config).run_dir):
                ensure_pretrained(cfg, ds_path, stop)
    else:
        from pipeline.train.pretrain import pretrain as train_stage
    if stop.honoured is None:
        with lost_ranks.reported(cfg.run_dir):
            train_stage(cfg, ds, stop)
    if stop.honoured is None:
        return 0
    from pipeline import distributed as dist_utils
    return exit_after_stop(stage, stop.honoured, dist_utils.is_main())


def _print_config(stage: str, config: str, overrides: list[str], ds_path: str) -> int:
    import json
    import yaml
    from pipeline.config import to_dict
    from pipeline.train.runtime import prepare
    cfg, ds = prepare(stage, config, overrides, ds_path)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(json.dumps(ds, indent=2))
    return 0
