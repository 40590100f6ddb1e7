#!/usr/bin/env python
"""Peak memory of a short fine-tune per model preset and ZeRO stage, every rank measured.

    python bench/memory.py [--presets tiny,small,base] [--stages 0,1,2,3] [--ranks 2] [--steps 3] [--batch 4]
                           [--workers N]

Each cell is a real ``deepspeed --num_gpus <ranks> launch/finetune.py`` run (bench/launched.py: demo_tiny.yaml's
data and fine-tuning recipe, random init, the final checkpoint saved, nothing validated, tested or exported)
with ds_configs/zero<stage>.json (stage "3o": zero3_offload.json) and torch AdamW; the table gives the largest
rank's peak resident set. On CUDA the figure would be torch.cuda.max_memory_allocated per rank: not measured by
this script, which runs the ranks on the CPU. Last line:
RESULT <preset>_zero<stage>_rss_mib=<MiB> ... (nan for a run that failed). Exits 0 whether or not one fails.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launched import PRESET_SETS, RUN_SETS, run_finetune  # noqa: E402  (bench/launched.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small,base")
    p.add_argument("--stages", default="0,1,2,3", help="ZeRO stages; 3o = stage 3 with CPU offload")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="micro batch per rank (anchors)")
    p.add_argument("--workers", type=int, default=None,
                   help="data.num_workers per rank (default: demo_tiny.yaml's); 0 decodes in the rank itself")
    p.add_argument("--quick", action="store_true", help="tiny preset, stages 0 and 3, 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.stages, args.steps = "tiny", "0,3", 2
    return args


def cell_sets(preset: str, args: argparse.Namespace) -> list[str]:
    """The --set overrides of one table cell's run (its ZeRO stage is the DeepSpeed JSON's)."""
    sets = [*PRESET_SETS[preset], *RUN_SETS, f"train.steps={args.steps}", f"train.micro_batch_size={args.batch}",
            "train.warmup_steps=1", f"train.log_every={args.steps}"]
    if args.workers is not None:
        sets.append(f"data.num_workers={args.workers}")
    return sets


def main(argv=None) -> None:
    args = parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    stages = [s for s in args.stages.split(",") if s]
    values: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="relalign_memory_") as tmp:
            for preset in presets:
                for stage in stages:
                    got = run_finetune(f"{preset}_zero{stage}", Path(tmp), cell_sets(preset, args), args.batch,
                                       args.ranks, stage)
                    values[f"{preset}_zero{stage}_rss_mib"] = got.peak_mib
                    print(f"[memory] {preset} ZeRO {stage}: largest rank's peak RSS {got.peak_mib:.0f} MiB "
                          f"({got.seconds:.0f} s)", flush=True)
        print(f"\n{args.ranks} ranks, {args.steps} steps of {args.batch} anchors per rank, CPU fp32, peak RSS of "
              "the largest rank\n")
        print("| preset | " + " | ".join(f"ZeRO {s}" for s in stages) + " |")
        print("| --- |" + " --- |" * len(stages))
        for preset in presets:
            print(f"| {preset} | " + " | ".join(f"{values[f'{preset}_zero{s}_rss_mib']:.0f} MiB" for s in stages)
                  + " |")
    except Exception:
        traceback.print_exc()
    print("RESULT " + (" ".join(f"{k}={v:.0f}" for k, v in values.items()) or "failed=1"), flush=True)


if __name__ == "__main__":
    main()
