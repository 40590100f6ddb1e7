"""The pretraining stage of a fine-tuning job (``model.pretrain_config``): pretrained on first use into the
pretraining config's run_dir/model, reused while that config is unchanged, like the data and tokenizer."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline import distributed as dist_utils
from pipeline.config import ExperimentConfig, resolve_path, training_fingerprint

STAMP_NAME = "relalign_stage.json"   # beside the exported model: the training config that produced it


@dataclasses.dataclass
class PretrainStage:
    cfg: ExperimentConfig
    ds_config: dict

    @property
    def model_dir(self) -> Path:
        return resolve_path(self.cfg.run_dir) / "model"

    def is_cached(self) -> bool:
        """Whether model_dir holds a complete export of this exact pretraining config."""
        from models import RetrievalModel
        stamp = self.model_dir / STAMP_NAME
        if not (stamp.is_file() and RetrievalModel.is_pretrained_dir(self.model_dir)):
            return False
        try:
            saved = json.loads(stamp.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError):
            return False
        return saved == json.loads(json.dumps(training_fingerprint(self.cfg), default=str))


def write_stamp(model_dir: Path, cfg: ExperimentConfig) -> None:
    """Record beside an exported model the training config that produced it (pretrain writes it)."""
    (Path(model_dir) / STAMP_NAME).write_text(json.dumps({"fingerprint": training_fingerprint(cfg)}, indent=1,
                                                         default=str) + "\n")


def stage_model_dir(pretrain_config: str) -> Path:
    """Where the pretraining config exports its model (its run_dir/model)."""
    from pipeline.config import load_config
    return resolve_path(load_config(pretrain_config).run_dir) / "model"


def with_stage_init(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with model.init at the stage's model dir (which may not exist yet: :func:`ensure_pretrained`
    builds it), so resume checks and the tokenizer see the same init on every run."""
    model = dataclasses.replace(cfg.model, init=str(stage_model_dir(cfg.model.pretrain_config)))
    return dataclasses.replace(cfg, model=model)


def ensure_pretrained(cfg: ExperimentConfig, ds_path: str) -> None:
    """Pretrain ``cfg.model.pretrain_config`` with the DeepSpeed JSON ``ds_path`` unless its exported model is
    cached for this exact config."""
    from pipeline.train.pretrain import pretrain
    from pipeline.train.runtime import prepare
    pre_cfg, pre_ds = prepare("pretrain", cfg.model.pretrain_config, [], ds_path)
    stage = PretrainStage(pre_cfg, pre_ds)
    cached = stage.is_cached()
    if dist_utils.rank() == 0:
        print(f"[finetune] pretraining stage {pre_cfg.name}: "
              + (f"reusing {stage.model_dir}" if cached else f"pretraining into {stage.model_dir}"), flush=True)
    if cached:
        return
    if not pre_cfg.checkpoint.export:
        from pipeline.errors import UserError
        raise UserError(f"model.pretrain_config {cfg.model.pretrain_config}: its checkpoint.export is false, so "
                        f"there is no model to fine-tune from; set it to true")
    pretrain(pre_cfg, pre_ds)   # exports and stamps the model
