"""The ablation end to end: plan, shared pretraining, one fine-tune per (variant, seed), tables, plots, MLflow."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pipeline.ablation import plan as P
from pipeline.ablation.plots import plot_group_score, plot_isda
from pipeline.ablation.report import Report, markdown, write_csv
from pipeline.ablation.results import differences, present, summaries
from pipeline.ablation.runner import RunOutcome, run_finetune, run_pretraining
from pipeline.ablation.tracking import ParentRun, open_parent
from pipeline.config import ExperimentConfig, check_output_dir, load_config, read_ds_config, resolve_path
from pipeline.errors import UserError


@dataclass(frozen=True)
class AblationArgs:
    config: str
    variants: str
    seeds: Optional[int]
    seed_list: Optional[str]
    quick: bool
    out: str
    deepspeed_config: str
    sets: tuple[str, ...]
    command: str


def make_plan(args: AblationArgs) -> tuple[P.Plan, ExperimentConfig]:
    """Every check on the user's input (UserError, exit 2) happens here, before anything runs."""
    P.check_user_sets(args.sets)
    variants = P.parse_variants(args.variants)
    seeds = P.parse_seeds(args.seeds, args.seed_list, args.quick)
    config, ds = resolve_path(args.config), resolve_path(args.deepspeed_config)
    cfg = load_config(str(config), list(args.sets))
    read_ds_config(ds)
    base = (P.quick_sets(cfg) if args.quick else []) + list(args.sets)
    plan = P.build_plan(config, ds, resolve_path(args.out), variants, seeds, base)
    P.check_reusable(plan)
    cfg = load_config(str(config), base)
    if cfg.model.pretrain_config and not resolve_path(cfg.model.pretrain_config).is_file():
        raise UserError(f"config 'model.pretrain_config' = {cfg.model.pretrain_config}: no such pretraining YAML")
    return plan, cfg


def run_all(plan: P.Plan, parent: Optional[ParentRun]) -> list[RunOutcome]:
    """The runs one after another; a crash is reported and the rest go on."""
    outcomes = []
    for spec in plan.runs:
        outcomes.append(run_finetune(plan, spec, parent.child_sets(spec) if parent else []))
    return outcomes


def enough_results(outcomes: Sequence[RunOutcome]) -> bool:
    """The baseline and at least one IAIS variant have a finished run."""
    done = {o.spec.variant for o in outcomes if o.has_results}
    return P.BASELINE in done and len(done) >= 2


def write_outputs(report: Report) -> list[Path]:
    out = report.plan.out
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.md", out / "results.csv", out / "isda_by_step.png", out / "group_score.png"]
    paths[0].write_text(markdown(report), encoding="utf-8")
    write_csv(report, paths[1])
    curves = {v: [o.spec.run_dir for o in report.outcomes if o.spec.variant == v and o.has_results]
              for v in report.plan.variants}
    plot_isda(curves, paths[2])
    plot_group_score(report.results, report.plan.variants, paths[3])
    return paths


def parent_metrics(report: Report) -> dict[str, float]:
    """Per-variant means (``<variant>/<metric>``) and paired differences (``<variant>_minus_none/<metric>``)."""
    metrics = present(report.results)
    out = {f"{v}/{k}": s.mean for (v, k), s in summaries(report.results, report.plan.variants, metrics).items()
           if s.n}
    out.update({f"{v}_minus_{P.BASELINE}/{k}": d.mean
                for (v, k), d in differences(report.results, report.plan.variants, metrics).items() if d.n})
    return out


def parent_params(plan: P.Plan, args: AblationArgs) -> dict[str, str]:
    return {"ablation.config": str(plan.config), "ablation.deepspeed_config": str(plan.deepspeed_config),
            "ablation.variants": ",".join(plan.variants), "ablation.seeds": ",".join(map(str, plan.seeds)),
            "ablation.quick": str(args.quick), "ablation.sets": json.dumps(list(plan.base_sets))}


def run_ablation(args: AblationArgs) -> int:
    start = time.perf_counter()
    plan, cfg = make_plan(args)
    check_output_dir(plan.out, "--out")
    plan.out.mkdir(parents=True, exist_ok=True)
    if cfg.model.pretrain_config:
        run_pretraining(plan, cfg.model.pretrain_config)
    parent = open_parent(cfg, plan, parent_params(plan, args))
    status, ok = "FAILED", False
    try:
        outcomes = run_all(plan, parent)
        report = Report(plan, cfg.name, args.command, time.perf_counter() - start, outcomes,
                        parent.run_id if parent else None)
        paths = write_outputs(report)
        print("\n" + paths[0].read_text(encoding="utf-8"), flush=True)
        ok = enough_results(outcomes)
        if parent:
            parent.log_results(parent_metrics(report), paths)
        status = "FINISHED" if ok else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent:
            parent.close(status)
    if not ok:
        print(f"[ablation] not enough results: the baseline '{P.BASELINE}' and at least one IAIS variant need a "
              f"finished run (see {plan.out / 'results.md'})", flush=True)
    return 0 if ok else 1
