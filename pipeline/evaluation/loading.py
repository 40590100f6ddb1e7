"""What an evaluation run loads: the model (save_pretrained or DeepSpeed checkpoint directory), its
tokenizer, the split and user quadruples. Every failure on user input is a one-line UserError."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pipeline.errors import UserError

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "launch" / "configs" / "demo_tiny.yaml"


def load_model(path: str, model_config: Optional[str] = None, tag: Optional[str] = None):
    """RetrievalModel from a save_pretrained directory or a DeepSpeed checkpoint directory (fp32)."""
    from models import RetrievalModel
    from pipeline.train.build import pretrained_model
    model_dir = Path(path)
    if RetrievalModel.is_pretrained_dir(model_dir):
        given = [name for name, value in (("--tag", tag), ("--model-config", model_config)) if value is not None]
        if given:   # they would be ignored: the directory's own config and weights are what gets evaluated
            raise UserError(f"--model {path} is a save_pretrained directory: {' and '.join(given)} apply only to "
                            f"a DeepSpeed checkpoint directory; drop them, or give the checkpoints directory")
        return pretrained_model(model_dir, f"--model {path}")
    if not (model_dir / "latest").is_file() and tag is None:
        raise UserError(f"--model {path}: neither a save_pretrained directory (config.json + "
                        "model.safetensors) nor a DeepSpeed checkpoint directory (with a 'latest' file)")
    return _model_from_checkpoint(model_dir, model_config_file(model_dir, model_config), tag)


def _model_from_checkpoint(model_dir: Path, config_file: Path, tag: Optional[str]):
    """The model of config_file with the fp32 weights of the checkpoint, read by the safe loader."""
    from models import ConfigError, RetrievalModel
    from models.retrieval import read_model_config
    from pipeline.train.checkpoint import checkpoint_state_dict   # DeepSpeed's ZeRO reader lives there
    try:
        model = RetrievalModel(read_model_config(config_file), load_backbone_weights=False)
    except ConfigError as exc:
        raise UserError(f"--model {model_dir}: {exc}") from None
    state = checkpoint_state_dict(model_dir, tag)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:   # a shape mismatch
        missing, unexpected = [str(exc).strip().splitlines()[-1].strip()], []
    if unexpected or set(missing) - {"mlm_head.decoder.weight"}:
        raise UserError(f"--model {model_dir}: checkpoint does not match the model config {config_file} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        "pass the right --model-config")
    return model


def model_config_file(model_dir: Path, given: Optional[str]) -> Path:
    """The config.json of a DeepSpeed checkpoint: ``given``, else beside it or in the run's model/."""
    if given:
        if not Path(given).is_file():
            raise UserError(f"--model-config {given}: no such file")
        return Path(given)
    for candidate in (model_dir / "config.json", model_dir.parent / "config.json",
                      model_dir.parent / "model" / "config.json"):
        if candidate.is_file():
            return candidate
    raise UserError(f"--model {model_dir} is a DeepSpeed checkpoint without a model config.json next to it: "
                    "pass --model-config (the config.json of a save_pretrained directory of the same model)")


def find_tokenizer(model_path: str, given: Optional[str], demo_cfg=None):
    """``given``, else the tokenizer beside the model (or in the run's model/), else the demo's."""
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.train import build
    if given:
        if not Path(given).is_file():
            raise UserError(f"--tokenizer {given}: no such file")
        return load_tokenizer(given)
    for base in (Path(model_path), Path(model_path).parent / "model"):
        for name in build.TOKENIZER_FILES:
            if (base / name).is_file():
                return load_tokenizer(base / name)
    demo = _demo_tokenizer(demo_cfg) if demo_cfg is not None else None
    if demo is not None:
        return load_tokenizer(demo)
    raise UserError(f"no tokenizer: --model {model_path} holds no tokenizer.model/tokenizer.txt; "
                    "pass --tokenizer")


def _demo_tokenizer(demo_cfg) -> Optional[Path]:
    from pipeline.config import split_path
    from pipeline.train.build import tokenizer_path
    path = tokenizer_path(demo_cfg, [split_path(demo_cfg, "train")])
    return path if path.is_file() else None


def check_vocab(tokenizer, model, model_path: str) -> None:
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"tokenizer has vocab_size {tokenizer.vocab_size} but the model {model_path} has "
                        f"{model.config.vocab_size}: pass the tokenizer the model was trained with "
                        "(--tokenizer)")


def resolve_split(shards: Optional[str], relations: Optional[str], progress: bool):
    """(shards spec, demo experiment config or None): ``shards``, else the demo's test split (built on
    first use). Checks that the given splits exist."""
    from pipeline.config import load_config, split_path
    from pipeline.data.paths import check_shards_exist
    if relations:
        check_shards_exist(relations, "--relations")
    if shards:
        check_shards_exist(shards, "--shards")
        return shards, None
    from pipeline.train.build import ensure_data
    cfg = load_config(DEMO_CONFIG)
    ensure_data(cfg, progress=progress)
    return split_path(cfg, "test"), cfg


def load_split(shards: str, model, tokenizer, max_regions: int):
    """The split as an EvalData, decoded the way the model's image encoder expects."""
    from pipeline.data.eval_split import load_eval_split
    from pipeline.data.loader import LoaderConfig
    mc = model.config
    kw = dict(shards=shards, image_size=mc.image.image_size, max_text_len=mc.max_text_len, num_workers=0,
              image_mode=mc.image.mode, max_regions=max_regions, feat_dim=mc.image.feat_dim)
    if mc.image.mode == "features":
        return load_eval_split(shards, tokenizer, LoaderConfig(**kw))
    return load_eval_split(shards, tokenizer, LoaderConfig.for_model(mc.image.backbone, **kw))


def load_quadruples(path: str, data, tokenizer, max_len: int):
    """(data with any new captions, quadruples) from a JSON list of {image0, caption0, image1, caption1}."""
    from pipeline.evaluation.winoground import resolve_quadruples
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--quadruples {path}: unreadable JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise UserError(f"--quadruples {path}: expected a JSON list of quadruple objects")
    return resolve_quadruples(data, entries, tokenizer, max_len)
