"""The per-step metric window (averaged over ranks, logged by rank 0), the metrics file and progress."""
from __future__ import annotations

import json
import math
import time


from pipeline import distributed as dist_utils
from pipeline.train.runtime import Run


# ----------------------------------------------------------------------------- metrics

class MetricWindow:
    """Sums scalars over a logging window; ``flush`` averages them over steps and ranks (counts summed)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, values: dict[str, float], samples: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.samples += samples

    def flush(self, skipped: dict[str, int]) -> dict[str, float]:
        """Collective: every rank calls it at the same steps with the same keys."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        means = {k: v / self.counts[k] for k, v in self.sums.items()}   # keys logged at some steps only
        means = dist_utils.reduce_scalars(means, "mean")
        # skip reasons differ between ranks (a rank may have skipped nothing): union of keys, 0 if absent
        counts = dist_utils.reduce_scalars({"samples_per_s": self.samples / elapsed,
                                            **{f"skipped_{k}": float(v) for k, v in skipped.items()}}, "sum",
                                           union_keys=True)
        self.__init__()
        return {**means, **counts}


def append_jsonl(run: Run, row: dict) -> None:
    """<run_dir>/metrics.jsonl on rank 0: the logged scalars, readable without MLflow."""
    if run.is_main:
        with open(run.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def finite_or_raise(values: dict[str, float], step: int) -> None:
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"step {step}: non-finite {bad}; lower the learning rate or check the data")


def progress(run: Run, total: int, initial: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not run.is_main, dynamic_ncols=True, desc=run.stage,
                unit="step", mininterval=2.0)
