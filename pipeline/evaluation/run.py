"""The evaluation application behind launch/evaluate.py: process group and device, loading, evaluation,
the results file, the printed table and MLflow."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline import distributed as ddp
from pipeline.config import check_layer_indices, check_output_dir
from pipeline.errors import UserError
from pipeline.evaluation import loading
from pipeline.evaluation.report import results_table


@dataclass(frozen=True)
class EvalJob:
    """What to evaluate and where the results go (the command line of launch/evaluate.py)."""
    model: str
    out: str = "runs/evaluate"
    model_config: Optional[str] = None
    tag: Optional[str] = None
    shards: Optional[str] = None
    tokenizer: Optional[str] = None
    quadruples: Optional[str] = None
    relations: Optional[str] = None
    max_regions: int = 36
    device: str = "auto"
    threads: int = 0
    timeout_s: Optional[float] = None       # collective timeout; None: DeepSpeed's default
    mlflow: bool = False
    mlflow_run_id: Optional[str] = None
    experiment: str = "relalign-eval"

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise UserError(f"--threads {self.threads}: give a number of threads >= 1, or 0 for torch's default")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise UserError(f"--timeout-s {self.timeout_s:g}: give the collective timeout in seconds (> 0)")


def select_device(name: str, local_rank: int) -> torch.device:
    """``auto`` (cuda when available), ``cpu`` or ``cuda``: this rank's device."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {name}: use auto, cpu or cuda")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    if not use_cuda:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def start(job: EvalJob) -> torch.device:
    """Threads, device and, with more than one process, the process group (nccl on GPUs, else gloo)."""
    if job.threads > 0:
        torch.set_num_threads(job.threads)
    info = ddp.discover(os.environ)
    device = select_device(job.device, info.local_rank)
    if info.world_size > 1:
        ddp.start_process_group(info, "nccl" if device.type == "cuda" else "gloo", job.timeout_s)
    return device


def run(job: EvalJob, cfg) -> dict[str, float]:
    """Collective. Evaluate ``job`` with the EvalConfig ``cfg``; rank 0 writes and reports the results."""
    from pipeline.evaluation.evaluate import evaluate, relations_split, winoground_on_split
    check_output_dir(job.out, "--out")
    device = start(job)
    model = loading.load_model(job.model, job.model_config, job.tag).to(device)
    check_layer_indices([cfg.isd_layer], model.config.num_layers, f"--isd-layer {cfg.isd_layer}")
    shards, demo_cfg = loading.resolve_split(job.shards, job.relations, cfg.progress)
    tokenizer = loading.find_tokenizer(job.model, job.tokenizer, demo_cfg)
    loading.check_vocab(tokenizer, model, job.model)
    data = loading.load_split(shards, model, tokenizer, job.max_regions)
    quads = None
    if job.quadruples:
        data, quads = loading.load_quadruples(job.quadruples, data, tokenizer, model.config.max_text_len)
    out = Path(job.out)
    pictures = out / "pictures" if cfg.pictures else None
    result = evaluate(model, data, cfg, quadruples=quads, picture_dir=pictures)
    relations = job.relations or (relations_split(demo_cfg) if demo_cfg is not None else None)
    if relations and cfg.winoground:
        relation_data = loading.load_split(relations, model, tokenizer, job.max_regions)
        result.metrics.update(winoground_on_split(model, relation_data, cfg))
    if ddp.is_main():
        report(job, result.metrics, results_payload(job, shards, data, device, result.metrics))
    return result.metrics


def results_payload(job: EvalJob, shards: str, data, device: torch.device, metrics: dict) -> dict:
    return {"model": str(job.model), "shards": str(shards), "images": data.n_images, "captions": data.n_texts,
            "skipped_samples": data.skipped, "world_size": ddp.world_size(), "device": str(device),
            "metrics": metrics}


def report(job: EvalJob, metrics: dict[str, float], payload: dict) -> None:
    """results.json, the printed table and, when asked, MLflow (rank 0 only)."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(results_table(metrics), flush=True)
    if payload["skipped_samples"]:
        print(f"skipped unreadable samples of {payload['shards']}: {payload['skipped_samples']}", flush=True)
    print(f"results: {out / 'results.json'}", flush=True)
    if job.mlflow or job.mlflow_run_id:
        log_to_mlflow(job, metrics, out)


def log_to_mlflow(job: EvalJob, metrics: dict[str, float], out: Path) -> None:
    from pipeline.tracking import Tracker, TrackingConfig
    tracker = Tracker.create(TrackingConfig(experiment_name=job.experiment), True, out,
                             resume_run_id=job.mlflow_run_id)
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    tracker.log_artifact(out / "results.json")
    if (out / "pictures").is_dir():
        tracker.log_artifact(out / "pictures", "eval_pictures")
    tracker.close()
