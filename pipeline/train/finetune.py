"""Retrieval fine-tuning with hard negatives and IAIS under DeepSpeed (the main job)."""
from __future__ import annotations

import json
import math
import time
from typing import Optional

from pipeline import distributed as dist_utils
from pipeline.train import checkpoint as ckpt, loop, runtime as T
from pipeline.config import split_path
from pipeline.train.finetune_step import FinetuneStep
from pipeline.train.negatives import CandidatePool
from pipeline.train.build import build_model, ensure_data, ensure_tokenizer, loader_config, to_device
from pipeline.data.loader import BatchStream
from pipeline.evaluation.evaluate import evaluate_split, relations_split, winoground_on_split
from pipeline.evaluation.report import recall_table


def run(config_path: Optional[str], overrides: list[str], ds_path: str) -> int:
    cfg, ds = T.prepare("finetune", config_path, overrides, ds_path)   # user errors end here, exit 2
    t_start = time.perf_counter()
    run = T.start(cfg, ds, "finetune")
    T.note(run, "process group ready")
    ensure_data(cfg, progress=run.is_main)
    train_spec = split_path(cfg, "train")
    tok_path, tokenizer = ensure_tokenizer(cfg, [train_spec])
    T.note(run, f"data and tokenizer ready ({tok_path.name}, {tokenizer.vocab_size} pieces)")
    model = build_model(cfg, tokenizer.vocab_size)
    engine = T.create_engine(model, run)
    T.note(run, f"DeepSpeed engine ready (ZeRO {T.zero_stage(run)}, world size {run.world_size})")
    job = FinetuneJob(run, engine, tokenizer, tok_path, train_spec)
    T.note(run, "loader, candidate pool and tracking ready")
    job.train()
    job.finish()
    if run.is_main:
        print(f"[finetune] done in {time.perf_counter() - t_start:.0f} s (process wall time)", flush=True)
    return 0


class FinetuneJob:
    def __init__(self, run: T.Run, engine, tokenizer, tok_path, train_spec: str):
        self.run, self.engine, self.tokenizer, self.tok_path = run, engine, tokenizer, tok_path
        cfg = self.cfg = run.cfg
        mbs = cfg.train.micro_batch_size
        self.loader_cfg = loader_config(cfg, train_spec, engine.module, mbs)
        self.step, self.best_rsum, self.best_tag, client = 0, -1.0, None, None
        resume = ckpt.resume_point(run.cfg)
        if resume is not None:
            client = ckpt.load_checkpoint(engine, run, resume)
            self.step = client["step"]
            self.best_rsum = client["extra"].get("best_rsum", -1.0)
            self.best_tag = client["extra"].get("best_tag")
        elif cfg.model.init and cfg.finetune.init_rank_from_itm:
            T.init_rank_head(engine, run)
        self.stream = BatchStream(self.loader_cfg, tokenizer, run.rank, run.world_size,
                                  state=client["loader"] if client else None)
        pool = CandidatePool(math.ceil(cfg.finetune.pool_size / mbs))
        self.pool = self.fill_pool(pool, resumed=client is not None)
        self.step_fn = FinetuneStep(cfg, engine.module, self.pool, run.device, cfg.train.steps, forward=engine)
        self.tracker = T.open_tracker(run, client)
        self._val_split = None

    # ---- data -------------------------------------------------------------------------------------
    def fill_pool(self, pool: CandidatePool, resumed: bool) -> CandidatePool:
        """The pool holds the last ``capacity`` batches of the stream, the step's own included. A fresh run
        reads ``capacity - 1`` batches into it before step 0 (so the first step mines from a full pool); a
        resumed run replays the same ``capacity - 1`` batches before its position, so its pool equals the
        uninterrupted run's."""
        fill = pool.batches.maxlen - 1
        for batch in (self.stream.history(fill) if resumed else (next(self.stream) for _ in range(fill))):
            pool.add(batch)
        return pool

    def eval_split(self, split: str):
        """An EvalData of ``split`` (train/val/test, or a shards path)."""
        from pipeline.data.eval_split import load_eval_split
        path = split_path(self.cfg, split) if split in ("train", "val", "test") else split
        lcfg = loader_config(self.cfg, path, self.engine.module, 1)
        return load_eval_split(path, self.tokenizer, lcfg)

    # ---- loop -------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg, run, engine = self.cfg, self.run, self.engine
        total, gas = cfg.train.steps, cfg.train.grad_accum
        window = loop.MetricWindow()
        bar = loop.progress(run, total, self.step)
        engine.train()
        while self.step < total:
            for _ in range(gas):
                batch = next(self.stream)
                self.pool.add(batch)
                batch = to_device(batch, run.device)
                loss, scalars = self.step_fn(batch, self.step, T.step_generator(cfg, self.step, run.rank))
                engine.backward(loss)
                engine.step()
            self.step += 1
            scalars.update(lr=T.current_lr(engine), grad_norm=T.grad_norm(engine))
            window.add(scalars, batch["input_ids"].shape[0] * gas)
            if self.step % cfg.train.log_every == 0 or self.step == total:
                self.log_window(window, bar)
            bar.update(1)
            if cfg.train.val_every and self.step % cfg.train.val_every == 0 and self.step < total:
                self.validate()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total:
                self.save()
        bar.close()

    def log_window(self, window: loop.MetricWindow, bar) -> None:
        values = window.flush(self.stream.skipped)
        loop.finite_or_raise({k: v for k, v in values.items() if k != "grad_norm"}, self.step)
        self.tracker.log_metrics(values, self.step)
        loop.append_jsonl(self.run, {"step": self.step, **values})
        bar.set_postfix(loss=f"{values['loss']:.4f}", samples_per_s=f"{values['samples_per_s']:.1f}")

    def save(self) -> str:
        extra = {"best_rsum": self.best_rsum, "best_tag": self.best_tag}
        return ckpt.save_checkpoint(self.engine, self.run, self.step, self.stream.state(), self.tracker.run_id
                                 if self.run.is_main else None, extra)

    # ---- evaluation -------------------------------------------------------------------------------
    def validate(self, final_tag: Optional[str] = None) -> dict:
        if self._val_split is None:
            ev = self.cfg.eval
            self._val_split = self.eval_split("val").subset(ev.val_max_images, ev.val_captions_per_image)
        pictures = self.run.run_dir / "pictures" / f"val_step{self.step:07d}"
        metrics = evaluate_split(self.engine.module, self._val_split, self.cfg.eval, pictures)
        if self.run.is_main and pictures.is_dir():
            self.tracker.log_artifact(pictures, f"pictures/val_step{self.step:07d}")
        self.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, self.step)
        loop.append_jsonl(self.run, {"step": self.step, **{f"val/{k}": v for k, v in metrics.items()}})
        if self.run.is_main:
            print("\n" + recall_table(metrics, f"validation @ step {self.step}"), flush=True)
        if self.cfg.checkpoint.keep_best and metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            self.best_tag = final_tag or "best"
            if final_tag is None:
                extra = {"best_rsum": self.best_rsum, "best_tag": self.best_tag}
                ckpt.save_checkpoint(self.engine, self.run, self.step, self.stream.state(), None, extra, tag="best")
        return metrics

    def finish(self) -> None:
        cfg, run = self.cfg, self.run
        tag = self.save()
        if cfg.train.val_every:   # with no periodic validation there is nothing to pick a best from
            self.validate(final_tag=tag)
        best = self.best_tag if cfg.checkpoint.keep_best and self.best_tag else tag
        if best != tag:   # test / export the best validated weights, not the last ones
            self.engine.load_checkpoint(str(run.ckpt_dir), tag=best, load_module_only=True,
                                        load_optimizer_states=False, load_lr_scheduler_states=False)
        if cfg.eval.test and split_path(cfg, "test"):
            pictures = run.run_dir / "pictures" / "test"
            metrics = evaluate_split(self.engine.module, self.eval_split("test"), cfg.eval, pictures)
            relations = relations_split(cfg)
            if relations is not None and cfg.eval.winoground:
                metrics.update(winoground_on_split(self.engine.module, self.eval_split(relations), cfg.eval))
            if run.is_main and pictures.is_dir():
                self.tracker.log_artifact(pictures, "pictures/test")
            self.tracker.log_metrics({f"test/{k}": v for k, v in metrics.items()}, self.step)
            if run.is_main:
                table = recall_table(metrics, f"test (weights of checkpoint {best})")
                print("\n" + table, flush=True)
                (run.run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                self.tracker.log_text(table + "\n", "test_recall.md")
        if cfg.checkpoint.export:
            out = ckpt.export_pretrained(self.engine, run, best, run.run_dir / "model", self.tok_path)
            if out is not None:
                print(f"[finetune] consolidated fp32 model: {out}", flush=True)
                self.tracker.log_artifact(out, "model")
        self.tracker.close("FINISHED")
        dist_utils.barrier()
