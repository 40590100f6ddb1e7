"""results.md (header, runs, mean +- std per variant, paired differences to the baseline) and results.csv."""
from __future__ import annotations

import csv
import math
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Sequence

from pipeline.ablation.plan import BASELINE, Plan
from pipeline.ablation.results import Metric, Results, differences, present, summaries
from pipeline.ablation.runner import RunOutcome
from pipeline.ablation.stats import CONFIDENCE

MISSING = "—"


def machine() -> str:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch_version}")


@dataclass(frozen=True)
class Report:
    plan: Plan
    config_name: str
    command: str
    wall_s: float
    outcomes: Sequence[RunOutcome]
    parent_run_id: str | None = None

    @property
    def results(self) -> Results:
        out: dict[str, dict[int, dict]] = {v: {} for v in self.plan.variants}
        for o in self.outcomes:
            if o.metrics is not None:
                out[o.spec.variant][o.spec.seed] = o.metrics
        return out

    def column(self, variant: str) -> str:
        runs = [o for o in self.outcomes if o.spec.variant == variant]
        done = sum(o.has_results for o in runs)
        crashed = sum(o.status == "crashed" for o in runs)
        return f"{variant} (n={done}/{len(runs)}{f', {crashed} crashed' if crashed else ''})"


def _fmt(x: float, digits: str, sign: bool = False) -> str:
    if not math.isfinite(x):
        return "n/a"
    return format(x, ("+" if sign else "") + digits)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def run_time(r: Report) -> str:
    done = [o for o in r.outcomes if o.has_results]
    total = sum(o.seconds for o in done)
    unknown = sum(not o.seconds for o in done)
    note = f" ({unknown} reused without a recorded time)" if unknown else ""
    return f"the {len(done)} fine-tunes with results took {total:.0f} s ({total / 60:.1f} min){note}"


def header_lines(r: Report) -> list[str]:
    p = r.plan
    lines = [f"# IAIS ablation: {r.config_name}", "",
             f"- command: `{r.command}`",
             f"- config: `{p.config}`; DeepSpeed: `{p.deepspeed_config}`; output: `{p.out}`",
             f"- variants: {', '.join(p.variants)}; seeds: {', '.join(map(str, p.seeds))} (paired: the same "
             f"seed gives every variant the same initialisation and data order)",
             f"- overrides for every run: {', '.join(f'`{s}`' for s in p.base_sets) or 'none'}",
             f"- machine: {machine()}",
             f"- wall time: {r.wall_s:.0f} s ({r.wall_s / 60:.1f} min) this invocation; {run_time(r)}"]
    if r.parent_run_id:
        lines.append(f"- MLflow parent run: `{r.parent_run_id}`")
    return lines


def runs_table(r: Report) -> list[str]:
    lines = ["## Runs", "", _row(["variant", "seed", "status", "seconds", "exit code", "log"]),
             _row(["---"] * 6)]
    for o in r.outcomes:
        seconds = f"{o.seconds:.0f}" if o.seconds else MISSING
        code = MISSING if o.exit_code is None else str(o.exit_code)
        status = "CRASHED" if o.status == "crashed" else o.status
        lines.append(_row([o.spec.variant, str(o.spec.seed), status, seconds, code, f"`{o.spec.log}`"]))
    return lines


def mean_table(r: Report, metrics: Sequence[Metric]) -> list[str]:
    variants = r.plan.variants
    stats = summaries(r.results, variants, metrics)
    lines = ["## Test metrics: mean ± std over seeds", "",
             _row(["metric", *(r.column(v) for v in variants)]), _row(["---"] * (len(variants) + 1))]
    for m in metrics:
        cells = []
        for v in variants:
            s = stats[(v, m.key)]
            cells.append(MISSING if s.n == 0 else f"{_fmt(s.mean, m.digits)} ± {_fmt(s.std, m.digits)}")
        lines.append(_row([f"{m.label} (`{m.key}`)", *cells]))
    return lines


def diff_table(r: Report, metrics: Sequence[Metric]) -> list[str]:
    others = [v for v in r.plan.variants if v != BASELINE]
    diffs = differences(r.results, r.plan.variants, metrics)
    pct = round(100 * CONFIDENCE)
    lines = [f"## Paired difference to `{BASELINE}`: mean of (variant − {BASELINE}) over seeds "
             f"[{pct}% t-interval]", "",
             _row(["metric", *(f"{v} − {BASELINE}" for v in others)]), _row(["---"] * (len(others) + 1))]
    for m in metrics:
        cells = []
        for v in others:
            d = diffs[(v, m.key)]
            interval = "n/a" if not math.isfinite(d.half_width) else \
                f"{_fmt(d.low, m.digits, True)}, {_fmt(d.high, m.digits, True)}"
            cells.append(MISSING if d.n == 0 else f"{_fmt(d.mean, m.digits, True)} [{interval}] (n={d.n})")
        lines.append(_row([f"{m.label} (`{m.key}`)", *cells]))
    return lines


def markdown(r: Report) -> str:
    metrics = present(r.results)
    parts = [header_lines(r), runs_table(r)]
    if metrics:
        parts += [mean_table(r, metrics), diff_table(r, metrics)]
    else:
        parts.append(["No run has test metrics yet."])
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


CSV_FIELDS = ("kind", "variant", "metric", "n", "mean", "std", "ci_low", "ci_high")


def _num(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else ""


def csv_rows(r: Report) -> list[dict[str, str]]:
    """kind "mean": mean and std over seeds; kind "diff_vs_none": paired difference and its t-interval."""
    metrics = present(r.results)
    rows = []
    for (v, key), s in summaries(r.results, r.plan.variants, metrics).items():
        rows.append({"kind": "mean", "variant": v, "metric": key, "n": str(s.n), "mean": _num(s.mean),
                     "std": _num(s.std), "ci_low": "", "ci_high": ""})
    for (v, key), d in differences(r.results, r.plan.variants, metrics).items():
        rows.append({"kind": f"diff_vs_{BASELINE}", "variant": v, "metric": key, "n": str(d.n),
                     "mean": _num(d.mean), "std": "", "ci_low": _num(d.low), "ci_high": _num(d.high)})
    return rows


def write_csv(r: Report, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(r))
