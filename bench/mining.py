#!/usr/bin/env python
"""Hard-negative mining: full cross-encoder scoring vs the ITC shortlist (finetune.itc_preselect), same seeds.

    python bench/mining.py [--steps 60] [--seeds 0,1] [--candidates 399] [--hard 31] [--shortlists 31,47]

The paper's recipe draws 399 candidates per anchor and keeps the 31 the cross-encoder scores highest. "full"
cross-scores all 399; "itc<k>" ranks the same 399 by ITC similarity and cross-scores only the k most similar
(finetune.itc_preselect=399, finetune.negative_size=k); with k = 31 the shortlist is the kept set and
nothing is cross-scored. Every run is the ablation's fine-tune
(launch/configs/ablation_tiny.yaml: the cached pretraining stage, IAIS at the authors' strength) at a fixed
step budget with one process under the deepspeed launcher, in <out>/<mode>/seed<s>/. A finished run is reused
when the command is repeated (--fresh deletes them first). Step time is the mean over the logged windows after
the first (train.log_every steps each) of micro_batch / samples_per_s; recall is the run's test split.
Writes <out>/results.md. Last line:
RESULT full_step_s=<s> speedup_itc<k>=<x> r1_drop_itc<k>=<points> ... (R@1 = mean of both directions; drop =
full - itc<k>, paired by seed). Exits 0 whether or not a target is met.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.ablation.runner import run_logged, stage_command  # noqa: E402
from pipeline.ablation.stats import paired_difference, summarize  # noqa: E402
from pipeline.train.finetune_step import cross_scored_per_anchor  # noqa: E402
from launched import logged_step_seconds  # noqa: E402  (bench/launched.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "launch" / "configs" / "ablation_tiny.yaml"))
    p.add_argument("--deepspeed-config", default=str(REPO / "ds_configs" / "zero0.json"))
    p.add_argument("--out", default=str(REPO / "runs" / "bench_mining"))
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps per run (the fixed budget)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--batch", type=int, default=8, help="anchors per step (the authors' train_batch_size)")
    p.add_argument("--candidates", type=int, default=399, help="candidates drawn per anchor")
    p.add_argument("--hard", type=int, default=31, help="hard negatives kept per anchor")
    p.add_argument("--shortlists", default="31,47",
                   help="ITC shortlist sizes that are cross-scored (one equal to --hard is kept whole, unscored)")
    p.add_argument("--pool", type=int, default=1024, help="finetune.pool_size (> --candidates)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="delete earlier runs in --out first")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 1 seed, 39 candidates, 7 kept")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.candidates, args.hard, args.shortlists, args.pool = 4, "0", 39, 7, "9,15", 128
    return args


@dataclass(frozen=True)
class Mode:
    name: str
    negative_size: int         # finetune.negative_size: the candidates (or ITC shortlist) per anchor
    preselect: int             # finetune.itc_preselect (0: off)

    def scored_per_anchor(self, hard: int) -> int:
        """Candidates the cross-encoder actually scores: none when the shortlist is the kept set."""
        return cross_scored_per_anchor(self.preselect, self.negative_size, hard)


def modes(args) -> list[Mode]:
    shortlists = [int(k) for k in args.shortlists.split(",") if k.strip()]
    return [Mode("full", args.candidates, 0)] + [Mode(f"itc{k}", k, args.candidates) for k in shortlists]


def run_sets(args, mode: Mode, seed: int, run_dir: Path) -> list[str]:
    log_every = max(1, min(10, args.steps // 4))
    return [f"seed={seed}", f"run_dir={run_dir}", f"train.steps={args.steps}",
            f"train.micro_batch_size={args.batch}", f"train.log_every={log_every}", "train.val_every=0",
            f"train.warmup_steps={max(1, args.steps // 10)}", f"train.threads={args.threads}",
            f"finetune.negative_size={mode.negative_size}", f"finetune.hard_size={args.hard}",
            f"finetune.itc_preselect={mode.preselect}", f"finetune.pool_size={args.pool}",
            "finetune.hard_start_step=0", f"checkpoint.every={args.steps}", "checkpoint.resume=auto",
            "tracking.enabled=false", "eval.pictures=0"]


def run_one(args, mode: Mode, seed: int) -> dict:
    run_dir = Path(args.out) / mode.name / f"seed{seed}"
    metrics_file = run_dir / "test_metrics.json"
    if not metrics_file.is_file():
        cmd = stage_command([str(REPO / "launch" / "finetune.py")], Path(args.config), Path(args.deepspeed_config),
                            run_sets(args, mode, seed, run_dir))
        start = time.perf_counter()
        code = run_logged(cmd, run_dir / "bench.log")
        print(f"[mining] {mode.name} seed {seed}: exit {code} after {time.perf_counter() - start:.0f} s "
              f"(log {run_dir / 'bench.log'})", flush=True)
        if code != 0 or not metrics_file.is_file():
            return {}
    test = json.loads(metrics_file.read_text())
    return {"step_s": logged_step_seconds(run_dir / "metrics.jsonl", args.batch),
            "r1": (test["txt_r1"] + test["img_r1"]) / 2,
            "txt_r1": test["txt_r1"], "img_r1": test["img_r1"], "rsum": test["rsum"]}


def by_seed(results: dict, mode: Mode, key: str) -> dict[int, float]:
    return {seed: row[key] for (name, seed), row in results.items() if name == mode.name and key in row}


def fmt(summary) -> str:
    return f"{summary.mean:.3g} +- {summary.std:.2g}" if summary.n > 1 else f"{summary.mean:.3g}"


def table(args, results: dict) -> tuple[str, dict[str, float]]:
    full = modes(args)[0]
    full_step = summarize(by_seed(results, full, "step_s").values())
    rows = ["| mode | cross-scored / anchor | step s | speedup | R@1 i->t | R@1 t->i | mean R@1 | R@1 drop vs full "
            "(95% t) | rsum |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    values = {"full_step_s": full_step.mean}
    for mode in modes(args):
        step = summarize(by_seed(results, mode, "step_s").values())
        speedup = full_step.mean / step.mean if step.n else math.nan
        drop = paired_difference(by_seed(results, full, "r1"), by_seed(results, mode, "r1"))
        interval = f"{drop.mean:+.2f} [{drop.low:+.2f}, {drop.high:+.2f}]" if drop.n > 1 else f"{drop.mean:+.2f}"
        rows.append(f"| {mode.name} | {mode.scored_per_anchor(args.hard)} | {fmt(step)} | {speedup:.2f}x | "
                    f"{fmt(summarize(by_seed(results, mode, 'txt_r1').values()))} | "
                    f"{fmt(summarize(by_seed(results, mode, 'img_r1').values()))} | "
                    f"{fmt(summarize(by_seed(results, mode, 'r1').values()))} | "
                    f"{interval if mode != full else '-'} | "
                    f"{fmt(summarize(by_seed(results, mode, 'rsum').values()))} |")
        if mode != full:
            values[f"speedup_{mode.name}"] = speedup
            values[f"r1_drop_{mode.name}"] = drop.mean
    return "\n".join(rows), values


def main(argv=None) -> None:
    args = parse_args(argv)
    values: dict[str, float] = {"full_step_s": math.nan}
    try:
        if args.fresh and Path(args.out).exists():
            shutil.rmtree(args.out)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        results = {(mode.name, seed): run_one(args, mode, seed) for seed in seeds for mode in modes(args)}
        text, values = table(args, results)
        header = (f"{args.steps} steps of {args.batch} anchors, {args.candidates} candidates drawn per anchor, "
                  f"{args.hard} kept, seeds {args.seeds}, config {Path(args.config).name}, {args.threads} threads")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.md").write_text(f"{header}\n\n{text}\n")
        print(header)
        print(text)
    except Exception:
        traceback.print_exc()
    print("RESULT " + " ".join(f"{k}={v:.4g}" for k, v in values.items()), flush=True)


if __name__ == "__main__":
    main()
