"""Retrieval fine-tuning with hard negatives and IAIS under DeepSpeed (the main job)."""
from __future__ import annotations

import json
import time
from typing import Optional

from pipeline import distributed as dist_utils
from pipeline.train import checkpoint as ckpt, loop, runtime as T
from pipeline.config import ExperimentConfig, split_path
from pipeline.train.finetune_step import FinetuneStep
from pipeline.train.negatives import CandidatePool
from pipeline.train.run_tracking import open_tracker
from pipeline.train.build import build_model, ensure_data, ensure_tokenizer, loader_config
from pipeline.data.loader import BatchStream
from pipeline.evaluation.evaluate import evaluate_split, relations_split, winoground_on_split
from pipeline.evaluation.report import results_table


def finetune(cfg: ExperimentConfig, ds_config: dict,
             stop: Optional[loop.StopFlag] = None) -> dict[str, float]:
    """Fine-tune under DeepSpeed (``cfg`` and ``ds_config`` from :func:`runtime.prepare`). Returns the test
    metrics, or the last logged training scalars when there is no test split or ``stop`` ended the run early
    (after saving a checkpoint to resume from)."""
    t_start = time.perf_counter()
    run = T.start(cfg, ds_config, "finetune")
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
    result = job.train(stop)
    if result.stopped is not None:
        job.close_stopped(result.stopped)
        return result.last_logged
    metrics = job.finish(stop)
    if metrics is None:
        return result.last_logged
    if run.is_main:
        print(f"[finetune] done in {time.perf_counter() - t_start:.0f} s (process wall time)", flush=True)
    return metrics or result.last_logged


FINISH_STATE = "relalign_finish.json"   # beside the final checkpoint: the phases of finish() already done


def read_finish_state(run: T.Run, tag: str) -> dict:
    path = run.ckpt_dir / tag / FINISH_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_finish_state(run: T.Run, tag: str, done: dict) -> None:
    path = run.ckpt_dir / tag / FINISH_STATE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(done, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


class FinetuneJob:
    def __init__(self, run: T.Run, engine, tokenizer, tok_path, train_spec: str):
        self.run, self.engine, self.tokenizer, self.tok_path = run, engine, tokenizer, tok_path
        cfg = self.cfg = run.cfg
        mbs = cfg.train.micro_batch_size
        self.loader_cfg = loader_config(cfg, train_spec, engine.module, mbs,
                                        swap_captions=cfg.finetune.swap_negatives)
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
        pool = CandidatePool.for_config(cfg, mbs)
        self.pool = self.fill_pool(pool, resumed=client is not None)
        self.step_fn = FinetuneStep(cfg, engine.module, self.pool, run.device, cfg.train.steps, forward=engine)
        self.tracker = open_tracker(run, client)
        self._val_split = None

    # ---- data -------------------------------------------------------------------------------------
    def fill_pool(self, pool: CandidatePool, resumed: bool) -> CandidatePool:
        """The pool holds the last ``capacity`` batches of the stream, the step's own included. A fresh run
        reads ``capacity - 1`` batches into it before step 0 (so the first step mines from a full pool); a
        resumed run replays the same ``capacity - 1`` batches before its position, so its pool equals the
        uninterrupted run's."""
        fill = pool.capacity_batches - 1
        for batch in (self.stream.history(fill) if resumed else (next(self.stream) for _ in range(fill))):
            pool.add(batch)
        return pool

    def eval_split(self, path: str):
        """An EvalData of the shards at ``path``."""
        from pipeline.data.eval_split import load_eval_split
        lcfg = loader_config(self.cfg, path, self.engine.module, 1)
        return load_eval_split(path, self.tokenizer, lcfg)

    # ---- loop -------------------------------------------------------------------------------------
    def hooks(self) -> loop.StageHooks:
        return loop.StageHooks(step_fn=self.step_fn, next_batch=lambda step, micro: next(self.stream),
                               on_batch=self.pool.add, save=self.save, skipped=lambda: self.stream.skipped,
                               validate=self.validate)

    def train(self, stop: Optional[loop.StopFlag] = None) -> loop.LoopResult:
        result = loop.train(self.run, self.engine, self.hooks(), self.tracker, self.step, stop)
        self.step = result.step
        return result

    def save(self, step: int) -> str:
        extra = {"best_rsum": self.best_rsum, "best_tag": self.best_tag}
        return ckpt.save_checkpoint(self.engine, self.run, step, self.stream.state(), self.tracker.run_id
                                    if self.run.is_main else None, extra)

    # ---- evaluation -------------------------------------------------------------------------------
    def validate(self, step: int, final_tag: Optional[str] = None) -> dict:
        if self._val_split is None:
            ev = self.cfg.eval
            val = self.eval_split(split_path(self.cfg, "val"))
            self._val_split = val.subset(ev.val_max_images, ev.val_captions_per_image)
        pictures = self.run.run_dir / "pictures" / f"val_step{step:07d}"
        metrics = evaluate_split(self.engine.module, self._val_split, self.cfg.eval, pictures)
        if self.run.is_main and pictures.is_dir():
            self.tracker.log_artifact(pictures, f"pictures/val_step{step:07d}")
        self.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
        loop.append_jsonl(self.run, {"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
        if self.run.is_main:
            print("\n" + results_table(metrics, f"validation @ step {step}"), flush=True)
        if self.cfg.checkpoint.keep_best and metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            self.best_tag = final_tag or "best"
            if final_tag is None:
                extra = {"best_rsum": self.best_rsum, "best_tag": self.best_tag}
                ckpt.save_checkpoint(self.engine, self.run, step, self.stream.state(), None, extra,
                                     tag="best")
        return metrics

    def finish(self, stop: Optional[loop.StopFlag] = None) -> Optional[dict[str, float]]:
        """Final save, validation, test and export; returns the test metrics ({} without a test), or None when
        ``stop`` ended the run between two of these phases. The phases done are recorded beside the final
        checkpoint, so a job preempted here resumes at the next phase instead of training again."""
        cfg, run = self.cfg, self.run
        tag = f"step{self.step:07d}"
        done = read_finish_state(run, tag)
        if not done:
            self.save(self.step)
            done = self.record_phase(tag, done, "saved", True)
        if self.stopped_between_phases(stop, "final save"):
            return None
        if cfg.train.val_every and "validated" not in done:   # no periodic validation: no best to pick
            self.validate(self.step, final_tag=tag)
            done = self.record_phase(tag, done, "validated", {"best_rsum": self.best_rsum, "best_tag": self.best_tag})
            if self.stopped_between_phases(stop, "final validation"):
                return None
        elif "validated" in done:
            self.best_rsum, self.best_tag = done["validated"]["best_rsum"], done["validated"]["best_tag"]
        best = self.best_tag if cfg.checkpoint.keep_best and self.best_tag else tag
        if best != tag:   # test / export the best validated weights, not the last ones
            self.engine.load_checkpoint(str(run.ckpt_dir), tag=best, load_module_only=True,
                                        load_optimizer_states=False, load_lr_scheduler_states=False)
        metrics = done.get("test")
        if metrics is None:
            metrics = self.test(best) if cfg.eval.test and split_path(cfg, "test") else {}
            done = self.record_phase(tag, done, "test", metrics)
            if self.stopped_between_phases(stop, "test evaluation"):
                return None
        if cfg.checkpoint.export:
            out = ckpt.export_pretrained(self.engine, run, best, run.run_dir / "model", self.tok_path)
            if out is not None:
                print(f"[finetune] consolidated fp32 model: {out}", flush=True)
                self.tracker.log_model(out, f"{self.cfg.name}-{self.run.stage}")
        self.tracker.close("FINISHED")
        dist_utils.barrier()
        return metrics

    def record_phase(self, tag: str, done: dict, phase: str, value) -> dict:
        done = {**done, phase: value}
        if self.run.is_main:
            write_finish_state(self.run, tag, done)
        return done

    def stopped_between_phases(self, stop: Optional[loop.StopFlag], phase: str) -> bool:
        """Collective: True (run closed as KILLED) when any rank's ``stop`` is set after ``phase``."""
        reason = loop.agreed_stop(stop)
        if reason is None:
            return False
        stop.honoured = reason
        self.close_stopped(f"{reason}, after the {phase}")
        return True

    def test(self, best: str) -> dict[str, float]:
        """Test split (+ Winoground on the relations split) with the weights of checkpoint ``best``."""
        cfg, run = self.cfg, self.run
        pictures = run.run_dir / "pictures" / "test"
        metrics = evaluate_split(self.engine.module, self.eval_split(split_path(cfg, "test")), cfg.eval, pictures)
        relations = relations_split(cfg)
        if relations is not None and cfg.eval.winoground:
            metrics.update(winoground_on_split(self.engine.module, self.eval_split(relations), cfg.eval))
        if run.is_main and pictures.is_dir():
            self.tracker.log_artifact(pictures, "pictures/test")
        self.tracker.log_metrics({f"test/{k}": v for k, v in metrics.items()}, self.step)
        if run.is_main:
            table = results_table(metrics, f"test (weights of checkpoint {best})")
            print("\n" + table, flush=True)
            (run.run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            self.tracker.log_text(table + "\n", "test_recall.md")
            self.tracker.set_tags({"mlflow.note.content": table})   # the run's description in the MLflow UI
        return metrics

    def close_stopped(self, reason: str) -> None:
        """After a stop: the checkpoint is saved; end the MLflow run (a resume continues it)."""
        if self.run.is_main:
            print(f"[finetune] stopped after step {self.step} ({reason}); resume with --resume", flush=True)
        self.tracker.close("KILLED")
        dist_utils.barrier()
