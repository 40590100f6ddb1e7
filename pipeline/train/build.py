"""Data and tokenizer on first use, the model (fresh or from a checkpoint), and loader configs."""
from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

import torch

from pipeline.config import DEFAULT_CACHE, ExperimentConfig, data_root, resolve_path
from pipeline.errors import UserError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.txt")   # beside a save_pretrained model (export writes them)


def ensure_data(cfg: ExperimentConfig, progress: bool) -> None:
    """Build the synthetic dataset when the config asks for it (locked: ranks may race)."""
    if cfg.data.synthetic is None:
        return
    from pipeline.data.synthetic import ensure_synthetic_dataset
    ensure_synthetic_dataset(data_root(cfg), cfg.data.synthetic, progress=progress)


def tokenizer_path(cfg: ExperimentConfig, stage_sources: list[str]) -> Path:
    """data.tokenizer, the tokenizer saved next to model.init, or one trained on the train captions."""
    if cfg.data.tokenizer:
        return resolve_path(cfg.data.tokenizer)
    if cfg.model.init:
        init = resolve_path(cfg.model.init)
        for name in TOKENIZER_FILES:
            if (init / name).is_file():
                return init / name
    key = hashlib.sha1(("|".join(str(resolve_path(s)) for s in stage_sources) + f"|{cfg.data.vocab_size}")
                       .encode()).hexdigest()[:10]
    root = data_root(cfg) or DEFAULT_CACHE / "tokenizers"
    return root / f"tokenizer-bpe{cfg.data.vocab_size}-{key}.model"


def ensure_tokenizer(cfg: ExperimentConfig, stage_sources: list[str]):
    from pipeline.data.tokenizer import SentencePieceTokenizer, iter_captions, load_tokenizer
    path = tokenizer_path(cfg, stage_sources)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(str(path) + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                SentencePieceTokenizer.train(iter_captions(stage_sources), path, cfg.data.vocab_size)
    return path, load_tokenizer(path)


def model_overrides(cfg: ExperimentConfig) -> dict:
    """ModelConfig overrides implied by the data section (text length, image size/mode) + model.overrides."""
    from models.registry import merge
    implied = {"max_text_len": cfg.data.max_text_len, "image": {"image_size": cfg.data.image_size}}
    if cfg.data.image_mode != "patch":
        implied["image"]["mode"] = cfg.data.image_mode
    return merge(implied, cfg.model.overrides)


def model_config(cfg: ExperimentConfig, vocab_size: int | None = None):
    """The ModelConfig a run builds: ``model.preset`` (a preset name, a config .json, or a save_pretrained
    directory's config.json) + the data section's implied fields + ``model.overrides`` (+ ``vocab_size``).
    The one resolver of start-up validation and :func:`build_model`, so whatever validates builds."""
    from models import ConfigError
    from models.registry import resolve_config
    overrides = model_overrides(cfg)
    if vocab_size is not None:
        overrides = {**overrides, "vocab_size": vocab_size}
    try:
        return resolve_config(_preset_base(cfg.model.preset), **overrides)
    except ConfigError as exc:
        raise UserError(f"config 'model.preset' = {cfg.model.preset!r} with model.overrides: {exc}") from None
    except TypeError as exc:
        raise UserError(f"model.overrides: {exc}") from None


def _preset_base(preset: str):
    """A preset name as it is, or the ModelConfig of a config .json / save_pretrained directory."""
    from models import ModelConfig
    path = resolve_path(preset)
    if path.suffix != ".json" and not path.is_dir():
        return preset
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"config 'model.preset' = {preset}: no such model config file; give a preset name, "
                        f"a config .json or a save_pretrained directory")
    try:
        return ModelConfig.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise UserError(f"config 'model.preset' = {preset}: {file} is not valid JSON (line {exc.lineno})") from None


def build_model(cfg: ExperimentConfig, vocab_size: int):
    """A fresh model from preset + overrides, or the weights of ``model.init``."""
    from models import RetrievalModel
    init = resolve_path(cfg.model.init) if cfg.model.init else None
    if init is not None and RetrievalModel.is_pretrained_dir(init):
        model = RetrievalModel.from_pretrained(init)
    else:
        model = RetrievalModel(model_config(cfg, vocab_size))
        if init is not None:
            model.load_state_dict(_state_dict_from(init), strict=False)
    if model.config.vocab_size != vocab_size:
        raise UserError(f"model.init {cfg.model.init} has vocab_size {model.config.vocab_size} but the tokenizer "
                        f"has {vocab_size}: use the tokenizer saved with the model (data.tokenizer)")
    return model


def _state_dict_from(path: Path) -> dict:
    if path.is_dir() and (path / "latest").is_file():
        from pipeline.train.checkpoint import checkpoint_state_dict
        return checkpoint_state_dict(path)
    if path.is_file() and path.suffix in (".pt", ".bin"):
        from models import load_uniter_checkpoint   # UNITER/IAIS-format checkpoints
        return load_uniter_checkpoint(str(path)).state_dict()
    raise UserError(f"model.init {path}: not a save_pretrained dir, DeepSpeed checkpoint dir or UNITER .pt")


def loader_config(cfg: ExperimentConfig, shards: str, model, batch_size: int, seed_offset: int = 0,
                  swap_captions: bool = False):
    from pipeline.data.loader import LoaderConfig
    d = cfg.data
    kw = dict(shards=shards, batch_size=batch_size, image_size=d.image_size, max_text_len=d.max_text_len,
              num_workers=d.num_workers, seed=cfg.seed + seed_offset, shuffle_buffer=d.shuffle_buffer,
              resampled=d.resampled, image_mode=d.image_mode, max_regions=d.max_regions,
              feat_dim=model.config.image.feat_dim, swap_captions=swap_captions)
    backbone = model.config.image.backbone
    if d.image_mode != "features" and backbone:
        return LoaderConfig.for_model(backbone, **kw)
    return LoaderConfig(**kw)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
