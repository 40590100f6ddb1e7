"""The pretraining stage of a fine-tuning job (``model.pretrain_config``): pretrained on first use into the
pretraining config's run_dir/model, reused while that config is unchanged, like the data and tokenizer."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from pipeline import distributed as dist_utils
from pipeline.config import ExperimentConfig, fingerprint_changes, resolve_path, training_fingerprint

STAMP_NAME = "relalign_stage.json"   # beside the exported model: the training config that produced it


def export_dir(cfg: ExperimentConfig) -> Path:
    """Where a pretraining run exports its model: its run_dir/model."""
    return resolve_path(cfg.run_dir) / "model"


def write_stamp(model_dir: Path, cfg: ExperimentConfig, run_id: Optional[str] = None) -> None:
    """Record beside an exported model the training config that produced it and its MLflow run (pretrain
    writes it; a fine-tune from the model becomes a child of that run)."""
    stamp = {"fingerprint": training_fingerprint(cfg), "mlflow_run_id": run_id}
    (Path(model_dir) / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")


def stamp_run_id(model_dir: Path) -> Optional[str]:
    """The MLflow run that exported ``model_dir``, if its stamp names one."""
    try:
        return json.loads((Path(model_dir) / STAMP_NAME).read_text(encoding="utf-8")).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None


def is_cached(cfg: ExperimentConfig) -> bool:
    """Whether the pretraining config ``cfg`` has a complete export stamped with its training config (a key added
    to the schema since, at its default, is no change: config.fingerprint_changes)."""
    from models import RetrievalModel
    model_dir = export_dir(cfg)
    stamp = model_dir / STAMP_NAME
    if not (stamp.is_file() and RetrievalModel.is_pretrained_dir(model_dir)):
        return False
    try:
        saved = json.loads(stamp.read_text(encoding="utf-8")).get("fingerprint")
        return isinstance(saved, dict) and not fingerprint_changes(saved, training_fingerprint(cfg))
    except (OSError, ValueError):
        return False


def with_stage_init(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with model.init at the stage's model dir (which may not exist yet: :func:`ensure_pretrained`
    builds it), so resume checks and the tokenizer see the same init on every run."""
    from pipeline.config import load_config
    model = dataclasses.replace(cfg.model, init=str(export_dir(load_config(cfg.model.pretrain_config))))
    return dataclasses.replace(cfg, model=model)


def ensure_pretrained(cfg: ExperimentConfig, ds_path: str, stop=None) -> None:
    """Pretrain ``cfg.model.pretrain_config`` with the DeepSpeed JSON ``ds_path`` unless its exported model is
    cached for this exact config. A stage stopped by ``stop`` (a StopFlag; preemption) resumes from its
    checkpoint when the job runs again."""
    from pipeline.train.pretrain import pretrain
    from pipeline.train.runtime import prepare
    pre_cfg, pre_ds = prepare("pretrain", cfg.model.pretrain_config, [], ds_path)
    cached = is_cached(pre_cfg)
    if dist_utils.rank() == 0:
        print(f"[finetune] pretraining stage {pre_cfg.name}: "
              + ("reusing " if cached else "pretraining into ") + str(export_dir(pre_cfg)), flush=True)
    if cached:
        return
    if not pre_cfg.checkpoint.export:
        from pipeline.errors import UserError
        raise UserError(f"model.pretrain_config {cfg.model.pretrain_config}: its checkpoint.export is false, so "
                        f"there is no model to fine-tune from; set it to true")
    pretrain(resuming_if_same_config(pre_cfg), pre_ds, stop)   # exports and stamps the model


def resuming_if_same_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` set to resume its newest complete checkpoint when that was trained with this same config (a
    stage preempted part-way); a changed config pretrains afresh."""
    from pipeline.errors import UserError
    from pipeline.train import checkpoint as ckpt
    auto = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))
    try:
        ckpt.check_resume_config(auto, ckpt.resume_point(auto))
    except UserError:
        return cfg
    return auto
