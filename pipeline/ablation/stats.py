"""Mean and spread over seeds, and paired differences to the baseline with Student-t intervals."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof 1; NaN with fewer than 2 values) of ``n`` values."""

    n: int
    mean: float
    std: float


@dataclass(frozen=True)
class PairedDiff:
    """Mean of ``variant - baseline`` over the ``n`` seeds both have, and its two-sided t-interval
    (``half_width``, ``low``, ``high`` are NaN with fewer than 2 seeds)."""

    n: int
    mean: float
    half_width: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def finite(values: Iterable[float]) -> list[float]:
    """The values that are real numbers (absent metrics come as None, undefined ones as NaN)."""
    out = []
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def summarize(values: Iterable[float]) -> Summary:
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return Summary(n, mean, std)


def t_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided ``confidence`` t-interval of a mean of ``n`` values with sample std ``std``."""
    if n < 2 or not math.isfinite(std):
        return math.nan
    from scipy.stats import t
    return float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)


def paired_difference(variant: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> PairedDiff:
    """Paired by seed: only the seeds with a finite value on both sides count."""
    diffs = [variant[s] - baseline[s] for s in sorted(set(variant) & set(baseline))
             if len(finite([variant[s], baseline[s]])) == 2]
    summary = summarize(diffs)
    return PairedDiff(summary.n, summary.mean, t_half_width(summary.std, summary.n, confidence))
