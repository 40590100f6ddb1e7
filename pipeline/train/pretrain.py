"""Pretraining: MLM + ITM + ITC mixed by configurable ratios (one task per step, the same on every rank),
streaming from one or several weighted shard sources; step-based; checkpoints with exact resume."""
from __future__ import annotations

import random
import time
from typing import Optional

from pipeline import distributed as dist_utils
from pipeline.train import checkpoint as ckpt, loop, runtime as T
from pipeline.config import ExperimentConfig, split_path
from pipeline.errors import UserError
from pipeline.train.objectives import (TASKS, choose_task, grounding_loss, itc_loss, itm_bce_loss, itm_loss,
                                       mlm_loss, mrfr_loss, wra_task_loss)
from pipeline.train.run_tracking import open_tracker
from pipeline.train.build import build_model, ensure_data, ensure_tokenizer, loader_config
from pipeline.data.loader import BatchStream

TASK_METRICS = {"itm": "itm_acc", "itc": "itc_acc", "grounding": "centre_acc"}   # the extra scalar per task


def sources(cfg: ExperimentConfig) -> list[tuple[str, float]]:
    if cfg.pretrain.sources:
        return [(s.shards, s.weight) for s in cfg.pretrain.sources]
    return [(split_path(cfg, "train"), 1.0)]


def choose_source(weights: list[float], seed: int, step: int, micro: int) -> int:
    """Source of one micro batch: weighted draw seeded by (seed, step, micro), the same on every rank."""
    rng = random.Random((seed * 1_000_003 + step) * 131 + micro + 7)
    return rng.choices(range(len(weights)), weights=weights)[0]


def pretrain(cfg: ExperimentConfig, ds_config: dict,
             stop: Optional[loop.StopFlag] = None) -> dict[str, float]:
    """Pretrain under DeepSpeed (``cfg`` and ``ds_config`` from :func:`runtime.prepare`); returns the last
    logged scalars. A set ``stop`` ends the run early after saving a checkpoint to resume from."""
    t_start = time.perf_counter()
    run = T.start(cfg, ds_config, "pretrain")
    ensure_data(cfg, progress=run.is_main)
    srcs = sources(cfg)
    tok_path, tokenizer = ensure_tokenizer(cfg, [s for s, _ in srcs])
    model = build_model(cfg, tokenizer.vocab_size)
    engine = T.create_engine(model, run)
    job = PretrainJob(run, engine, tokenizer, tok_path, srcs)
    result = job.train(stop)
    job.finish(result.stopped, stop)
    if run.is_main and (stop is None or stop.honoured is None):
        print(f"[pretrain] done in {time.perf_counter() - t_start:.0f} s (process wall time)", flush=True)
    return result.last_logged


class PretrainJob:
    def __init__(self, run: T.Run, engine, tokenizer, tok_path, srcs: list[tuple[str, float]]):
        self.run, self.engine, self.tokenizer, self.tok_path = run, engine, tokenizer, tok_path
        cfg = self.cfg = run.cfg
        self.weights = [w for _, w in srcs]
        self.step, client = 0, None
        resume = ckpt.resume_point(run.cfg)
        if resume is not None:
            client = ckpt.load_checkpoint(engine, run, resume)
            self.step = client["step"]
        states = client["loader"] if client else [None] * len(srcs)
        if len(states) != len(srcs):
            raise UserError(f"checkpoint has {len(states)} data sources but the config has {len(srcs)}")
        mbs, swaps = cfg.train.micro_batch_size, cfg.pretrain.swap_negatives
        self.streams = [BatchStream(loader_config(cfg, spec, engine.module, mbs, i, swap_captions=swaps),
                                    tokenizer, run.rank, run.world_size, state=st)
                        for i, ((spec, _), st) in enumerate(zip(srcs, states))]
        self.tracker = open_tracker(run, client)

    def task_loss(self, task: str, batch: dict, generator) -> tuple:
        module = self.engine.module
        if task == "mlm":
            return mlm_loss(module, batch, self.tokenizer, self.cfg.pretrain.mlm_prob, generator), {}
        if task == "mrfr":
            return mrfr_loss(module, batch, self.cfg.pretrain.mrfr_prob, generator), {}
        pt = self.cfg.pretrain
        swaps = pt.swap_negatives
        if task == "itm":
            loss, acc = (itm_bce_loss(module, batch, generator, pt.itm_other_images, swaps) if pt.itm_loss == "bce"
                         else itm_loss(module, batch, generator, swaps))
            return loss, {"itm_acc": acc}
        if task == "wra":
            return wra_task_loss(module, batch, generator, swaps), {}
        if task == "grounding":
            loss, accuracy = grounding_loss(module, batch, self.cfg.grounding)
            return loss, {"centre_acc": accuracy}
        loss, acc = itc_loss(module, batch)
        return loss, {"itc_acc": acc}

    def step_tasks(self, step: int) -> list[str]:
        """The tasks of ``step``: one drawn by the ratios (UNITER), or every task with a ratio (pretrain.task_mix:
        sum, their losses weighted by the ratios)."""
        ratios = vars(self.cfg.pretrain.tasks)
        if self.cfg.pretrain.task_mix == "sum":
            return [t for t in TASKS if ratios.get(t, 0) > 0]
        return [choose_task(ratios, self.cfg.seed, step)]

    def step_fn(self, batch: dict, step: int, generator) -> tuple:
        """One micro-step of the step's task(s). Every key on every step (zeros for the other tasks) keeps the
        cross-rank reduction aligned; per-task means are recovered from the *_steps counters."""
        tasks, ratios = self.step_tasks(step), vars(self.cfg.pretrain.tasks)
        scalars = {f"{t}{suffix}": 0.0 for t in TASKS for suffix in ("_loss_sum", "_steps")}
        scalars.update({f"{name}_sum": 0.0 for name in TASK_METRICS.values()})
        total = 0.0
        for task in tasks:
            loss, extra = self.task_loss(task, batch, generator)
            total = total + (loss * ratios[task] if len(tasks) > 1 else loss)
            scalars[f"{task}_loss_sum"], scalars[f"{task}_steps"] = loss.item(), 1.0
            for key, value in extra.items():
                scalars[f"{key}_sum"] = value
        scalars["loss"] = total.item()
        return total, scalars

    def next_batch(self, step: int, micro: int) -> dict:
        return next(self.streams[choose_source(self.weights, self.cfg.seed, step, micro)])

    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.streams:
            for k, v in s.skipped.items():
                total[k] = total.get(k, 0) + v
        return total

    def hooks(self) -> loop.StageHooks:
        return loop.StageHooks(step_fn=self.step_fn, next_batch=self.next_batch, save=self.save,
                               skipped=self.skipped, summarise=task_means)

    def train(self, stop: Optional[loop.StopFlag] = None) -> loop.LoopResult:
        result = loop.train(self.run, self.engine, self.hooks(), self.tracker, self.step, stop)
        self.step = result.step
        return result

    def finish(self, stopped: Optional[str], stop: Optional[loop.StopFlag] = None) -> None:
        """Final save and export; after a stop only the tracker is closed (the loop saved). A stop seen after
        the final save ends the run there: the resumed job starts at the export."""
        if stopped is None:
            tag = self.save(self.step)
            stopped = loop.agreed_stop(stop)
            if stopped is not None:
                stop.honoured = stopped
            elif self.cfg.checkpoint.export:
                self.export(tag)
        if stopped is not None and self.run.is_main:
            print(f"[pretrain] stopped after step {self.step} ({stopped}); resume with --resume", flush=True)
        self.tracker.close("FINISHED" if stopped is None else "KILLED")
        dist_utils.barrier()

    def export(self, tag: str) -> None:
        out = ckpt.export_pretrained(self.engine, self.run, tag, self.run.run_dir / "model", self.tok_path)
        if out is not None:
            from pipeline.train.stages import write_stamp
            # a fine-tune naming this config as its stage reuses the export (and is a child of this run)
            write_stamp(out, self.cfg, self.tracker.run_id)
            print(f"[pretrain] consolidated fp32 model: {out}", flush=True)
            self.tracker.log_model(out, f"{self.cfg.name}-{self.run.stage}")

    def save(self, step: int) -> str:
        return ckpt.save_checkpoint(self.engine, self.run, step, [s.state() for s in self.streams],
                                    self.tracker.run_id if self.run.is_main else None)


def task_means(raw: dict[str, float]) -> dict[str, float]:
    """Window means -> logged values: per-task losses and accuracies from the *_sum / *_steps counters."""
    values = {k: v for k, v in raw.items() if not k.endswith(("_sum", "_steps"))}
    for t in TASKS:
        if raw.get(f"{t}_steps", 0) > 0:
            values[f"{t}_loss"] = raw[f"{t}_loss_sum"] / raw[f"{t}_steps"]
    for t, name in TASK_METRICS.items():
        if raw.get(f"{t}_steps", 0) > 0:
            values[name] = raw[f"{name}_sum"] / raw[f"{t}_steps"]
    return values
