"""Command line of launch/ablation.py."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional

from pipeline.ablation import plan as P
from pipeline.cli import DEFAULT_DS, REPO
from pipeline.errors import exit_code_of

DEFAULT_CONFIG = REPO / "launch" / "configs" / "ablation_tiny.yaml"
DEFAULT_OUT = "runs/ablation"
QUICK_OUT = "runs/ablation_quick"

DESCRIPTION = """\
relalign ablation: does IAIS help? Fine-tunes the config once per (variant, seed), one run after another,
each its own `deepspeed launch/finetune.py` process, and compares every IAIS variant with the baseline
'none' on the test metrics: mean +- std over seeds and the paired difference (same seed = same init and
data order) with a 95% t-interval."""

EPILOG = f"""\
Variants: none sets finetune.iais.alignment=none; singular, distributed and congruence set that alignment
and keep the config's finetune.iais side, weight and schedule.

--quick (for a first look; its own default --out {QUICK_OUT}): seeds 0,1 unless --seeds/--seed-list
is given; train.steps and {", ".join(P.QUICK_SCALED)}
divided by {P.QUICK_DIVISOR} (rounded down, at least 1 where non-zero; "auto" left alone);
{" and ".join(P.QUICK_FIXED)}. Your --set come after these, so they win. ablation_tiny.yaml as shipped:
4 variants x 2 seeds of 50 fine-tuning steps (warmup 5, validation every 12 steps, checkpoints every 25) after
the shared pretraining stage (reused when the main job already built it); README "Does IAIS help?" gives the
measured wall times.

Output in --out: <variant>/seed<s>/ (each run's run_dir; its stdout and stderr in ablation.log), results.md
(also printed at the end), results.csv (kind mean / diff_vs_none rows), isda_by_step.png, group_score.png,
parent_run.json. A run whose test_metrics.json exists is reused, so running the same command again runs only
what has no results (a crashed run resumes from its checkpoints with checkpoint.resume: auto); a finished run
made with other settings stops the driver (use another --out). With tracking enabled, every run logs to one
MLflow store (the config's tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite <out>/mlflow.db), nested
under the parent run ablation-<config name>, which gets the tables, the pictures and the per-variant means.
With model.pretrain_config set, that pretraining stage runs once first, as its own process (the code every
fine-tune runs first: it pretrains unless the stage's export is cached for that config); the fine-tunes reuse it.

Exit codes: 0 when the baseline and at least one IAIS variant have results (crashed runs are reported and
marked), 1 otherwise or when the shared pretraining crashed, 2 bad input (one line on stderr: 'error: ...')."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/ablation.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help=f"fine-tuning experiment YAML (default {DEFAULT_CONFIG.relative_to(REPO)})")
    parser.add_argument("--variants", default=",".join(P.VARIANTS),
                        help=f"comma-separated, from {','.join(P.VARIANTS)}; must include none (default: all)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=None, metavar="N",
                       help=f"seeds 0..N-1 (default {P.DEFAULT_SEEDS}; {P.QUICK_SEEDS} with --quick)")
    seeds.add_argument("--seed-list", default=None, metavar="S,S,...", help="explicit seeds, e.g. 0,1,2")
    parser.add_argument("--quick", action="store_true", help="fewer seeds and steps (see below)")
    parser.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--deepspeed_config", default=str(DEFAULT_DS),
                        help=f"DeepSpeed JSON for every run (default {DEFAULT_DS.relative_to(REPO)})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key in every run, as launch/finetune.py --set (repeatable)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from pipeline.ablation.driver import AblationArgs, run_ablation
    from pipeline.ablation.runner import PretrainingFailed
    raw = sys.argv[1:] if argv is None else argv
    ns = build_parser().parse_args(raw)
    args = AblationArgs(config=ns.config, variants=ns.variants, seeds=ns.seeds, seed_list=ns.seed_list,
                        quick=ns.quick, out=ns.out or (QUICK_OUT if ns.quick else DEFAULT_OUT),
                        deepspeed_config=ns.deepspeed_config, sets=tuple(ns.sets),
                        command=shlex.join(["python", "launch/ablation.py", *raw]))
    try:
        return exit_code_of(lambda: run_ablation(args))
    except PretrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("[ablation] interrupted; run the same command again to continue", file=sys.stderr, flush=True)
        return 130
