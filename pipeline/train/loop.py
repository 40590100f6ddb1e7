"""The one training loop of both stages, with its metric window (averaged over ranks, logged by rank 0), the
metrics file, the progress bar and the stop flag.

A stage plugs in a :class:`StageHooks` (its step function, where its batches come from, validation, saving)
and calls :func:`train`; its final save, test and export stay in the stage."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from pipeline import distributed as dist_utils
from pipeline.train import runtime as T
from pipeline.train.build import to_device
from pipeline.train.runtime import Run
from pipeline.stopping import StopFlag

StepFn = Callable[[dict, int, torch.Generator], tuple[torch.Tensor, dict]]


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


def mean_scalars(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the rows that hold it (the micro-batches of one optimizer step)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def append_jsonl(run: Run, row: dict) -> None:
    """<run_dir>/metrics.jsonl on rank 0: the logged scalars, readable without MLflow."""
    if run.is_main:
        with open(run.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def finite_or_raise(values: dict[str, float], step: int) -> None:
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"step {step}: non-finite {bad}; lower the learning rate or check the data")


class LineProgress:
    """The progress bar's interface for logs that are not a terminal (Slurm, CI, files): one plain line per
    logging window (``set_postfix``) instead of thousands of carriage-return redraws."""

    def __init__(self, stage: str, total: int, initial: int, enabled: bool) -> None:
        self.stage, self.total, self.n, self.enabled = stage, total, initial, enabled
        self.t0, self.start = time.perf_counter(), initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: str) -> None:
        if not self.enabled:
            return
        rate = (self.n - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        shown = " ".join(f"{k}={v}" for k, v in values.items())
        print(f"[{self.stage}] step {self.n}/{self.total} {shown} steps_per_s={rate:.2f}", flush=True)

    def close(self) -> None:
        return None


def progress(run: Run, total: int, initial: int):
    """A tqdm bar on a terminal, plain lines otherwise (rank 0 only either way)."""
    import sys
    if not sys.stderr.isatty():
        return LineProgress(run.stage, total, initial, enabled=run.is_main)
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not run.is_main, dynamic_ncols=True, desc=run.stage,
                unit="step", mininterval=2.0)


# ----------------------------------------------------------------------------- stopping

def agreed_stop(stop: Optional[StopFlag]) -> Optional[str]:
    """The stop reason if any rank's flag is set (collective when a process group is up: every rank must
    stop at the same step, since the save that follows is collective), else None."""
    if stop is None:
        return None
    anyone = dist_utils.reduce_scalars({"stop": float(stop.is_set())}, "max")["stop"] > 0
    if not anyone:
        return None
    return stop.reason or "stop requested on another rank"


# ----------------------------------------------------------------------------- the loop

def _nothing(batch: dict) -> None:
    return None


def _same(values: dict[str, float]) -> dict[str, float]:
    return values


@dataclass
class StageHooks:
    """What a stage plugs into :func:`train`."""
    step_fn: StepFn                                   # (batch, step, generator) -> (loss, scalars)
    next_batch: Callable[[int, int], dict]            # (step, micro index) -> the next batch, on the CPU
    save: Callable[[int], str]                        # (step) -> checkpoint tag
    skipped: Callable[[], dict[str, int]]             # loader skip counters by reason
    on_batch: Callable[[dict], None] = _nothing       # each CPU batch, before the step (fine-tuning's pool)
    validate: Optional[Callable[[int], object]] = None   # (step); every train.val_every steps
    summarise: Callable[[dict], dict] = _same         # window means -> the values logged


@dataclass
class LoopResult:
    step: int                                         # optimizer steps done
    stopped: Optional[str] = None                     # the stop reason; None when every step ran
    last_logged: dict[str, float] = field(default_factory=dict)


class NonFiniteLoss(RuntimeError):
    """The loss of a micro-batch was NaN or Inf on some rank; raised before its update is applied."""


def nonfinite_keys(loss: torch.Tensor, batch: dict) -> Optional[list[str]]:
    """Collective: None when the loss is finite on every rank, else the sample keys of the batches whose loss
    was not (from every rank; "image_id <n>" where a batch carries no keys)."""
    finite = bool(torch.isfinite(loss.detach()).all())
    if dist_utils.reduce_scalars({"nonfinite": float(not finite)}, "max")["nonfinite"] == 0:
        return None
    mine = [] if finite else list(batch.get("keys") or [f"image_id {int(i)}" for i in batch["image_id"]])
    return [key for keys in dist_utils.all_gather_object(mine) for key in keys]


def optimizer_step(run: Run, engine, hooks: StageHooks, step: int) -> tuple[dict[str, float], int]:
    """``train.grad_accum`` micro-steps; returns the scalars averaged over them and the samples seen.
    Micro-batch ``i`` draws from ``step_generator(..., salt=i)``: salt 0 is the generator of an unsalted
    step, so runs at grad_accum 1 (and their resumes) are unchanged. A NaN/Inf loss on any rank is caught
    before its backward (every rank agrees): ``train.nonfinite`` "stop" raises :class:`NonFiniteLoss` naming
    the step and the batch's samples, "skip" leaves the weights as they are and counts the step."""
    cfg = run.cfg
    rows, samples = [], 0
    for micro in range(cfg.train.grad_accum):
        batch = hooks.next_batch(step, micro)
        hooks.on_batch(batch)
        batch = to_device(batch, run.device)
        loss, scalars = hooks.step_fn(batch, step, T.step_generator(cfg, step, run.rank, salt=micro))
        bad = nonfinite_keys(loss, batch)
        if bad is not None:
            shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            if cfg.train.nonfinite == "stop":
                raise NonFiniteLoss(f"step {step + 1}: the loss is not finite, stopped before the update (weights "
                                    f"of step {step}); samples of the batch: {shown}. Lower the learning rate, "
                                    f"check these samples, or set train.nonfinite=skip")
            if run.is_main:
                print(f"[{run.stage}] step {step + 1}: non-finite loss skipped (no update); samples: {shown}",
                      flush=True)
            rows.append({"nonfinite_skipped_steps": 1.0})
            continue
        engine.backward(loss)
        engine.step()
        rows.append(scalars)
        samples += batch["input_ids"].shape[0]
    return mean_scalars(rows), samples


def log_window(run: Run, tracker, window: MetricWindow, hooks: StageHooks, bar,
               step: int) -> dict[str, float]:
    values = hooks.summarise(window.flush(hooks.skipped()))
    finite_or_raise({k: v for k, v in values.items() if k != "grad_norm"}, step)
    tracker.log_metrics(values, step)
    append_jsonl(run, {"step": step, **values})
    bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", samples_per_s=f"{values['samples_per_s']:.1f}")
    return values


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


def train(run: Run, engine, hooks: StageHooks, tracker, start_step: int,
          stop: Optional[StopFlag] = None) -> LoopResult:
    """Optimizer steps from ``start_step`` to ``train.steps``: logging every ``train.log_every`` steps (and at
    the last), validation every ``train.val_every`` and a checkpoint every ``checkpoint.every`` (both not at
    the last step: the stage's finish does those). After each step before the last, a set ``stop`` flag
    saves a checkpoint and returns early."""
    cfg = run.cfg
    total = cfg.train.steps
    if cfg.train.nonfinite == "skip" and cfg.train.grad_accum > 1:
        from pipeline.errors import UserError
        raise UserError(f"train.nonfinite=skip needs one micro-batch per step (grad_accum is {cfg.train.grad_accum}:"
                        f" the other micro-batches' gradients are already accumulated); use train.nonfinite=stop")
    window, bar = MetricWindow(), progress(run, total, start_step)
    result = LoopResult(step=start_step)
    engine.train()
    try:
        while result.step < total:
            scalars, samples = optimizer_step(run, engine, hooks, result.step)
            step = result.step = result.step + 1
            scalars.update(lr=T.current_lr(engine), grad_norm=T.grad_norm(engine))
            window.add(scalars, samples)
            bar.update(1)
            if _due(cfg.train.log_every, step) or step == total:
                result.last_logged = log_window(run, tracker, window, hooks, bar, step)
            if step == total:
                break
            if hooks.validate is not None and _due(cfg.train.val_every, step):
                hooks.validate(step)
            saved = _due(cfg.checkpoint.every, step)
            if saved:
                hooks.save(step)
            result.stopped = agreed_stop(stop)
            if result.stopped is not None:
                stop.honoured = result.stopped
                if window.steps:   # the steps since the last log would otherwise never be logged
                    result.last_logged = log_window(run, tracker, window, hooks, bar, step)
                if not saved:
                    hooks.save(step)
                break
    finally:
        bar.close()
    return result
