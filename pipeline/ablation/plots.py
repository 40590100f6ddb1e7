"""The ablation's two pictures (matplotlib, Agg): validation ISDa against step, and the Winoground group score."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from pipeline.ablation.results import Results, values
from pipeline.ablation.stats import finite, summarize

CHANCE_GROUP = 100.0 / 6   # a random scorer's Winoground group score, percent
ISDA_KEY = "val/isda"


def isda_by_step(run_dir: Path) -> dict[int, float]:
    """step -> validation ISDa from <run_dir>/metrics.jsonl (the last row of a step wins: a resumed run may
    repeat one)."""
    path = run_dir / "metrics.jsonl"
    out: dict[int, float] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and ISDA_KEY in row and finite([row[ISDA_KEY]]) and "step" in row:
            out[int(row["step"])] = float(row[ISDA_KEY])
    return out


def mean_curve(run_dirs: Sequence[Path]) -> tuple[list[int], list[float]]:
    """Steps and the mean ISDa over the runs that validated at each step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for run_dir in run_dirs:
        for step, value in isda_by_step(run_dir).items():
            by_step[step].append(value)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_isda(curves: dict[str, Sequence[Path]], path: Path) -> None:
    """One line per variant: mean validation ISDa over its seeds against the training step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = 0
    for variant, run_dirs in curves.items():
        steps, means = mean_curve(run_dirs)
        if steps:
            ax.plot(steps, means, marker="o", label=variant)
            drawn += 1
    if drawn:
        ax.legend(title="IAIS alignment")
    else:
        ax.text(0.5, 0.5, "no validation ISDa rows (train.val_every = 0?)", ha="center", va="center",
                transform=ax.transAxes)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("validation ISDa (lower: relations aligned)")
    ax.set_title("ISDa during fine-tuning, mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_group_score(results: Results, variants: Sequence[str], path: Path) -> None:
    """Winoground group score per variant: mean over seeds, std error bars, the chance line."""
    plt = _pyplot()
    stats = [(v, summarize(values(results, v, "wino_group").values())) for v in variants]
    stats = [(v, s) for v, s in stats if s.n]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if stats:
        errors = [s.std if math.isfinite(s.std) else 0.0 for _, s in stats]
        ax.bar([v for v, _ in stats], [s.mean for _, s in stats], yerr=errors, capsize=4, color="tab:blue")
    ax.axhline(CHANCE_GROUP, color="tab:red", linestyle="--", label=f"chance {CHANCE_GROUP:.1f}")
    ax.set_ylabel("Winoground group score (%)")
    ax.set_title("relation-swap group score, mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
