"""The metrics an ablation compares (test_metrics.json keys) and the per-variant, per-seed values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from pipeline.ablation.plan import BASELINE
from pipeline.ablation.stats import PairedDiff, Summary, finite, paired_difference, summarize
from pipeline.config import ALIGNMENTS, SIDES


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    digits: str            # format of a value: ".2f" for percentages, ".3g" for the small ISD values


_RECALL = [Metric(f"{key}_r{k}", f"{what} R@{k}", ".2f")
           for key, what in (("txt", "image->text"), ("img", "text->image")) for k in (1, 5, 10)]
METRICS: tuple[Metric, ...] = (
    *_RECALL,
    Metric("rsum", "rsum", ".2f"),
    Metric("wino_text", "Winoground text", ".2f"),
    Metric("wino_image", "Winoground image", ".2f"),
    Metric("wino_group", "Winoground group", ".2f"),
    Metric("isda", "ISDa (annotated)", ".3g"),
    Metric("grounding_acc", "grounding accuracy %", ".2f"),
    *(Metric(f"isd_{a}_{s}", f"paper ISD {a} {s}", ".3g") for a in ALIGNMENTS for s in SIDES),
)

# variant -> seed -> test metrics (only the runs that have results)
Results = Mapping[str, Mapping[int, Mapping[str, float]]]


def values(results: Results, variant: str, key: str) -> dict[int, float]:
    """seed -> value of ``key`` for the runs of ``variant`` where it is a finite number."""
    out = {}
    for seed, metrics in results.get(variant, {}).items():
        got = finite([metrics.get(key)])
        if got:
            out[seed] = got[0]
    return out


def present(results: Results) -> list[Metric]:
    """The metrics of METRICS that some run reports (a config may switch some evaluations off)."""
    return [m for m in METRICS if any(values(results, v, m.key) for v in results)]


def summaries(results: Results, variants: Sequence[str], metrics: Sequence[Metric]) -> dict[tuple[str, str], Summary]:
    """(variant, metric key) -> mean and std over seeds."""
    return {(v, m.key): summarize(values(results, v, m.key).values()) for v in variants for m in metrics}


def differences(results: Results, variants: Sequence[str],
                metrics: Sequence[Metric]) -> dict[tuple[str, str], PairedDiff]:
    """(variant, metric key) -> paired difference to the baseline, for every non-baseline variant."""
    return {(v, m.key): paired_difference(values(results, v, m.key), values(results, BASELINE, m.key))
            for v in variants if v != BASELINE for m in metrics}
