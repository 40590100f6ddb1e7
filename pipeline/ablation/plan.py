"""What an ablation runs: variants x seeds, one run directory each, the per-run ``--set`` overrides, ``--quick``
and which runs already have results."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.config import ExperimentConfig, load_config
from pipeline.errors import UserError

BASELINE = "none"
VARIANTS = (BASELINE, "singular", "distributed", "congruence")
DEFAULT_SEEDS = 3
QUICK_SEEDS = 2
QUICK_DIVISOR = 4
# step-valued keys that --quick divides by QUICK_DIVISOR along with train.steps
QUICK_SCALED = ("train.warmup_steps", "train.val_every", "checkpoint.every", "finetune.hard_start_step")
QUICK_FIXED = ("eval.two_stage=false", "eval.pictures=0")
# keys the driver sets per run: a user --set of them would break the layout or the pairing
DRIVER_KEYS = {"seed": "--seeds / --seed-list", "run_dir": "--out",
               "finetune.iais.alignment": "--variants"}
RECORD_FILE = "ablation_run.json"


def quoted(text: Any) -> str:
    """``text`` as a YAML scalar that --set parses back to the same string (a JSON string is valid YAML)."""
    return json.dumps(str(text))


def parse_variants(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--variants {text}: a variant is named twice")
    if BASELINE not in names or len(names) < 2:
        raise UserError(f"--variants {text}: name the baseline '{BASELINE}' and at least one IAIS variant "
                        f"(the table reports each variant against '{BASELINE}')")
    return names


def parse_seeds(count: Optional[int], seed_list: Optional[str], quick: bool) -> tuple[int, ...]:
    """--seed-list wins; else --seeds N means 0..N-1; else 3 seeds (2 with --quick)."""
    if seed_list is not None:
        try:
            seeds = tuple(int(s) for s in seed_list.split(",") if s.strip())
        except ValueError:
            raise UserError(f"--seed-list {seed_list!r}: give comma-separated integers, e.g. 0,1,2") from None
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise UserError(f"--seed-list {seed_list!r}: give at least one seed, each >= 0 and distinct")
        return seeds
    n = count if count is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS)
    if n < 1:
        raise UserError(f"--seeds {n}: give at least 1 seed")
    return tuple(range(n))


def check_user_sets(sets: Sequence[str]) -> None:
    for assignment in sets:
        key = assignment.split("=", 1)[0].strip()
        if key in DRIVER_KEYS:
            raise UserError(f"--set {assignment}: '{key}' is set per run by the driver; use {DRIVER_KEYS[key]}")


def _get(cfg: ExperimentConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _scaled(value: int) -> int:
    return max(1, value // QUICK_DIVISOR) if value > 0 else 0


def quick_sets(cfg: ExperimentConfig) -> list[str]:
    """--quick: train.steps and the step-valued keys of QUICK_SCALED divided by 4 (rounded down, at least 1
    where non-zero; "auto" left alone), two-stage retrieval and pictures off."""
    sets = [f"train.steps={_scaled(cfg.train.steps)}"]
    for key in QUICK_SCALED:
        value = _get(cfg, key)
        if isinstance(value, int) and not isinstance(value, bool):
            sets.append(f"{key}={_scaled(value)}")
    return sets + list(QUICK_FIXED)


@dataclass(frozen=True)
class RunSpec:
    """One fine-tune of the ablation. ``sets``: every --set that decides its results, in order."""

    variant: str
    seed: int
    run_dir: Path
    sets: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"

    @property
    def log(self) -> Path:
        return self.run_dir / "ablation.log"

    @property
    def test_metrics(self) -> Path:
        return self.run_dir / "test_metrics.json"

    @property
    def record(self) -> Path:
        return self.run_dir / RECORD_FILE


@dataclass(frozen=True)
class Plan:
    config: Path
    deepspeed_config: Path
    out: Path
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    base_sets: tuple[str, ...]      # --quick's then the user's, applied to every run
    runs: tuple[RunSpec, ...]


def run_sets(base_sets: Sequence[str], variant: str, seed: int, run_dir: Path) -> tuple[str, ...]:
    return (*base_sets, f"seed={seed}", f"run_dir={quoted(run_dir)}", f"finetune.iais.alignment={variant}")


def build_plan(config: Path, ds: Path, out: Path, variants: Sequence[str], seeds: Sequence[int],
               base_sets: Sequence[str]) -> Plan:
    """Every run's overrides, each checked by loading the config with them (a bad value stops here, exit 2)."""
    runs = []
    for variant in variants:
        for seed in seeds:
            run_dir = out / variant / f"seed{seed}"
            sets = run_sets(base_sets, variant, seed, run_dir)
            load_config(str(config), list(sets))
            runs.append(RunSpec(variant, seed, run_dir, sets))
    return Plan(config, ds, out, tuple(variants), tuple(seeds), tuple(base_sets), tuple(runs))


# ----------------------------------------------------------------------------- results on disk

def record_of(plan: Plan, spec: RunSpec) -> dict[str, Any]:
    """What ``spec``'s results depend on; stored in <run_dir>/ablation_run.json before it runs."""
    return {"config": str(plan.config), "deepspeed_config": str(plan.deepspeed_config), "sets": list(spec.sets)}


def write_record(plan: Plan, spec: RunSpec, **extra: Any) -> None:
    """The record, plus ``extra`` (the run's seconds once it has finished)."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    spec.record.write_text(json.dumps({**record_of(plan, spec), **extra}, indent=1) + "\n", encoding="utf-8")


def read_record(spec: RunSpec) -> dict[str, Any]:
    try:
        stored = json.loads(spec.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def finished_metrics(spec: RunSpec) -> Optional[dict[str, Any]]:
    """The run's test metrics, or None when it has none (a test_metrics.json cut short counts as none)."""
    if not spec.test_metrics.is_file():
        return None
    try:
        metrics = json.loads(spec.test_metrics.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        print(f"[ablation] {spec.label}: {spec.test_metrics} is unreadable; running it again", file=sys.stderr)
        return None
    return metrics if isinstance(metrics, dict) else None


def check_reusable(plan: Plan) -> None:
    """UserError when a finished run was made with other settings than this plan gives it."""
    for spec in plan.runs:
        stored = read_record(spec) if finished_metrics(spec) is not None else {}
        if not stored:
            continue
        wanted = record_of(plan, spec)
        changed = [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in wanted.items() if k != "sets" and stored.get(k) != v]
        sets = stored.get("sets", [])
        changed += [f"--set {s} (was not given)" for s in wanted["sets"] if s not in sets]
        changed += [f"--set {s} (given then, not now)" for s in sets if s not in wanted["sets"]]
        if changed:
            raise UserError(f"{spec.run_dir} finished with other settings ({'; '.join(changed[:3])}): rerun into "
                            f"another --out, or delete that run directory to run it again")
