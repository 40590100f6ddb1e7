#!/usr/bin/env python
"""How the fine-tuning step time grows with negative_size, hard_size, sequence length and world size.

    python bench/growth.py [--steps 12] [--batch 8] [--quick]

Each row is a short real fine-tune of the tiny preset (bench/launched.py: demo_tiny.yaml's recipe, random
init) that changes one knob from the reference row (negative_size 31, hard_size 3, 64 px images, 1 rank).
Sequence length is changed through the image size: timm's test_vit backbone gives (image_size / 16)^2 patch
tokens beside the caption's (4, 16, 36). World size: every rank keeps --batch anchors, so the global batch grows with it
and samples/s is the figure to compare. Step time is micro_batch / samples_per_s, mean over the logged windows
after the first. Last line: RESULT <knob>_<value>_step_s=<s> ... Exits 0 whether or not a run fails.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launched import PRESET_SETS, RUN_SETS, run_finetune  # noqa: E402  (bench/launched.py)

REFERENCE = {"negative_size": 31, "hard_size": 3, "image_size": 64, "ranks": 1}
GRID = {"negative_size": (7, 31, 127), "hard_size": (1, 3, 7), "image_size": (32, 64, 96), "ranks": (1, 2)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="anchors per rank and step")
    p.add_argument("--quick", action="store_true", help="4 steps, two values of negative_size only")
    return p.parse_args(argv)


def rows(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("negative_size", 7), ("negative_size", 31)]
    seen, out = set(), []
    for knob, values in GRID.items():
        for value in values:
            point = tuple(sorted({**REFERENCE, knob: value}.items()))
            if point not in seen:   # the reference row once
                seen.add(point)
                out.append((knob, value))
    return out


def sets_for(knob: str, value: int, steps: int, batch: int) -> tuple[list[str], int]:
    point = {**REFERENCE, knob: value}
    log_every = max(1, steps // 4)
    sets = [*PRESET_SETS["tiny"], *RUN_SETS, f"train.steps={steps}", f"train.micro_batch_size={batch}",
            "train.warmup_steps=1", f"train.log_every={log_every}", "finetune.hard_start_step=0",
            f"finetune.negative_size={point['negative_size']}", f"finetune.hard_size={point['hard_size']}",
            f"data.image_size={point['image_size']}"]
    return sets, point["ranks"]


def main(argv=None) -> None:
    args = parse_args(argv)
    steps = 4 if args.quick else args.steps
    values: dict[str, float] = {}
    try:
        table = ["| knob | value | step s | samples/s (all ranks) |", "| --- | --- | --- | --- |"]
        with tempfile.TemporaryDirectory(prefix="relalign_growth_") as tmp:
            for knob, value in rows(args.quick):
                sets, ranks = sets_for(knob, value, steps, args.batch)
                got = run_finetune(f"{knob}_{value}", Path(tmp), sets, args.batch, ranks)
                values[f"{knob}_{value}_step_s"] = got.step_s
                table.append(f"| {knob} | {value} | {got.step_s:.3f} | {ranks * args.batch / got.step_s:.1f} |")
                print(f"[growth] {knob}={value}: {got.step_s:.3f} s/step ({got.seconds:.0f} s)", flush=True)
        print(f"\ntiny preset, {steps} steps of {args.batch} anchors per rank, reference {REFERENCE}\n")
        print("\n".join(table))
    except Exception:
        traceback.print_exc()
    print("RESULT " + (" ".join(f"{k}={v:.4g}" for k, v in values.items()) or "failed=1"), flush=True)


if __name__ == "__main__":
    main()
