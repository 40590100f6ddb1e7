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
from pipeline.train.objectives import TASKS, choose_task, itc_loss, itm_loss, mlm_loss, mrfr_loss
from pipeline.train.build import build_model, ensure_data, ensure_tokenizer, loader_config, to_device
from pipeline.data.loader import BatchStream

def sources(cfg: ExperimentConfig) -> list[tuple[str, float]]:
    if cfg.pretrain.sources:
        return [(s.shards, s.weight) for s in cfg.pretrain.sources]
    return [(split_path(cfg, "train"), 1.0)]


def choose_source(weights: list[float], seed: int, step: int, micro: int) -> int:
    """Source of one micro batch: weighted draw seeded by (seed, step, micro), the same on every rank."""
    rng = random.Random((seed * 1_000_003 + step) * 131 + micro + 7)
    return rng.choices(range(len(weights)), weights=weights)[0]


def run(config_path: Optional[str], overrides: list[str], ds_path: str) -> int:
    cfg, ds = T.prepare("pretrain", config_path, overrides, ds_path)
    t_start = time.perf_counter()
    run = T.start(cfg, ds, "pretrain")
    ensure_data(cfg, progress=run.is_main)
    srcs = sources(cfg)
    tok_path, tokenizer = ensure_tokenizer(cfg, [s for s, _ in srcs])
    model = build_model(cfg, tokenizer.vocab_size)
    engine = T.create_engine(model, run)
    PretrainJob(run, engine, tokenizer, tok_path, srcs).train_and_export()
    if run.is_main:
        print(f"[pretrain] done in {time.perf_counter() - t_start:.0f} s (process wall time)", flush=True)
    return 0


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
        self.streams = [BatchStream(loader_config(cfg, spec, engine.module, cfg.train.micro_batch_size, i),
                                    tokenizer, run.rank, run.world_size, state=st)
                        for i, ((spec, _), st) in enumerate(zip(srcs, states))]
        self.tracker = T.open_tracker(run, client)

    def task_loss(self, task: str, batch: dict, generator) -> tuple:
        module = self.engine.module
        if task == "mlm":
            return mlm_loss(module, batch, self.tokenizer, self.cfg.pretrain.mlm_prob, generator), {}
        if task == "mrfr":
            return mrfr_loss(module, batch, self.cfg.pretrain.mrfr_prob, generator), {}
        if task == "itm":
            loss, acc = itm_loss(module, batch, generator)
            return loss, {"itm_acc": acc}
        loss, acc = itc_loss(module, batch)
        return loss, {"itc_acc": acc}

    def train_and_export(self) -> None:
        cfg, run, engine = self.cfg, self.run, self.engine
        total, gas = cfg.train.steps, cfg.train.grad_accum
        ratios = vars(cfg.pretrain.tasks)
        window = loop.MetricWindow()
        bar = loop.progress(run, total, self.step)
        engine.train()
        while self.step < total:
            task = choose_task(ratios, cfg.seed, self.step)
            parts = []
            for micro in range(gas):
                src = choose_source(self.weights, cfg.seed, self.step, micro)
                batch = to_device(next(self.streams[src]), run.device)
                loss, extra = self.task_loss(task, batch, T.step_generator(cfg, self.step, run.rank, micro))
                engine.backward(loss)
                engine.step()
                parts.append(loss.item())
            self.step += 1
            value = sum(parts) / len(parts)
            # every key on every step (zeros for the other tasks) keeps the cross-rank reduction aligned;
            # per-task means are recovered from the *_steps counters
            scalars = {"loss": value, "lr": T.current_lr(engine), "grad_norm": T.grad_norm(engine)}
            for t in TASKS:
                scalars[f"{t}_loss_sum"] = value if t == task else 0.0
                scalars[f"{t}_steps"] = 1.0 if t == task else 0.0
            scalars["itm_acc_sum"] = extra.get("itm_acc", 0.0)
            scalars["itc_acc_sum"] = extra.get("itc_acc", 0.0)
            window.add(scalars, batch["input_ids"].shape[0] * gas)
            if self.step % cfg.train.log_every == 0 or self.step == total:
                self.log_window(window, bar)
            bar.update(1)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total:
                self.save()
        bar.close()
        tag = self.save()
        if cfg.checkpoint.export:
            out = ckpt.export_pretrained(engine, run, tag, run.run_dir / "model", self.tok_path)
            if out is not None:
                print(f"[pretrain] consolidated fp32 model: {out}", flush=True)
                self.tracker.log_artifact(out, "model")
        self.tracker.close("FINISHED")
        dist_utils.barrier()

    def log_window(self, window: loop.MetricWindow, bar) -> None:
        skipped: dict[str, int] = {}
        for s in self.streams:
            for k, v in s.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
        raw = window.flush(skipped)
        values = {k: v for k, v in raw.items() if not k.endswith(("_sum", "_steps"))}
        for t in TASKS:
            if raw.get(f"{t}_steps", 0) > 0:
                values[f"{t}_loss"] = raw[f"{t}_loss_sum"] / raw[f"{t}_steps"]
        for t in ("itm", "itc"):
            if raw.get(f"{t}_steps", 0) > 0:
                values[f"{t}_acc"] = raw[f"{t}_acc_sum"] / raw[f"{t}_steps"]
        loop.finite_or_raise({k: v for k, v in values.items() if k != "grad_norm"}, self.step)
        self.tracker.log_metrics(values, self.step)
        loop.append_jsonl(self.run, {"step": self.step, **values})
        bar.set_postfix(loss=f"{values['loss']:.4f}", samples_per_s=f"{values['samples_per_s']:.1f}")

    def save(self) -> str:
        return ckpt.save_checkpoint(self.engine, self.run, self.step, [s.state() for s in self.streams],
                                 self.tracker.run_id if self.run.is_main else None)
