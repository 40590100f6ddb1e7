"""Data and tokenizer on first use, the model (fresh or from a checkpoint), and loader configs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline import distributed as dist_utils
from pipeline.config import DEFAULT_CACHE, ExperimentConfig, data_root, is_remote, resolve_path
from pipeline.errors import UserError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.txt")   # beside a save_pretrained model (export writes them)


def ensure_data(cfg: ExperimentConfig, progress: bool) -> None:
    """Collective. Build the synthetic dataset when the config asks for it: global rank 0 builds, the others
    wait at a barrier (no file locks: a shared filesystem need not honour them)."""
    if cfg.data.synthetic is None:
        return
    from pipeline.data.synthetic import ensure_synthetic_dataset
    if dist_utils.is_main():
        ensure_synthetic_dataset(data_root(cfg), cfg.data.synthetic, progress=progress)
    dist_utils.barrier()


def tokenizer_path(cfg: ExperimentConfig, stage_sources: list[str]) -> Path:
    """data.tokenizer, the tokenizer saved next to model.init, or one trained on the train captions."""
    if cfg.data.tokenizer:
        return resolve_path(cfg.data.tokenizer)
    if cfg.model.init:
        init = resolve_path(cfg.model.init)
        for name in TOKENIZER_FILES:
            if (init / name).is_file():
                return init / name
    key = hashlib.sha1(("|".join(_source_key(s) for s in stage_sources) + f"|{cfg.data.vocab_size}")
                       .encode()).hexdigest()[:10]
    remote_root = bool(cfg.data.root) and is_remote(cfg.data.root)
    root = (None if remote_root else data_root(cfg)) or DEFAULT_CACHE / "tokenizers"
    return root / f"tokenizer-bpe{cfg.data.vocab_size}-{key}.model"


def _source_key(spec: str) -> str:
    """A shard spec as it names its data: a URL or pipe: command as given, a local path made absolute."""
    return spec if is_remote(spec) else str(resolve_path(spec))


def ensure_tokenizer(cfg: ExperimentConfig, stage_sources: list[str]):
    """Collective. The run's tokenizer; one trained on the captions is built once (global rank 0; written
    atomically) while the other ranks wait at a barrier, then reused."""
    from pipeline.data.tokenizer import SentencePieceTokenizer, iter_captions, load_tokenizer
    path = tokenizer_path(cfg, stage_sources)
    if dist_utils.is_main() and not path.is_file():
        SentencePieceTokenizer.train(iter_captions(stage_sources), path, cfg.data.vocab_size)
    dist_utils.barrier()
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
        model = pretrained_model(init, f"model.init {cfg.model.init}")
    else:
        model = RetrievalModel(model_config(cfg, vocab_size))
        if init is not None:
            load_init_weights(model, _state_dict_from(init), f"model.init {cfg.model.init}")
    if model.config.vocab_size != vocab_size:
        raise UserError(f"model.init {cfg.model.init} has vocab_size {model.config.vocab_size} but the tokenizer "
                        f"has {vocab_size}: use the tokenizer saved with the model (data.tokenizer)")
    return model


def pretrained_model(directory: Path, what: str):
    """RetrievalModel.from_pretrained(directory); a bad config.json or weights file is a UserError."""
    from models import ConfigError, RetrievalModel
    try:
        return RetrievalModel.from_pretrained(directory)
    except ConfigError as exc:
        raise UserError(f"{what}: {exc}") from None


TIED_KEYS = {"mlm_head.decoder.weight"}   # the word embeddings under another name; checkpoints may omit it


def load_init_weights(model, state: dict, what: str) -> None:
    """Loads the weights of ``state`` that the model has. Nothing in common or a shape mismatch is a
    UserError; keys missing on either side are reported (rank 0) and the missing ones keep their init."""
    own = model.state_dict()
    common = [k for k in state if k in own]
    if not common:
        raise UserError(f"{what}: none of its {len(state)} weights is a weight of this model (its keys: "
                        f"{_some(list(state))}; the model's: {_some(list(own))}); give a checkpoint of this model")
    reshaped = [k for k in common if tuple(state[k].shape) != tuple(own[k].shape)]
    if reshaped:
        k = reshaped[0]
        raise UserError(f"{what}: {len(reshaped)} weight(s) have another shape than the model's, e.g. {k} "
                        f"{tuple(state[k].shape)} vs {tuple(own[k].shape)}; set model.preset/model.overrides "
                        f"to the size the checkpoint was trained with")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in TIED_KEYS]
    if missing or result.unexpected_keys:
        from pipeline import distributed as dist_utils
        if dist_utils.is_main():
            print(f"[init] {what}: loaded {len(common)} of the model's {len(own)} weights; "
                  f"{len(missing)} missing, kept as initialised: {_some(missing)}; "
                  f"{len(result.unexpected_keys)} unexpected, ignored: {_some(result.unexpected_keys)}", flush=True)


def _some(keys: list[str], shown: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _state_dict_from(path: Path) -> dict:
    if path.is_dir() and (path / "latest").is_file():
        from pipeline.train.checkpoint import checkpoint_state_dict
        return checkpoint_state_dict(path)
    if path.is_file() and path.suffix in (".pt", ".bin"):
        return _uniter_state_dict(path)
    raise UserError(f"model.init {path}: not a save_pretrained dir, DeepSpeed checkpoint dir or UNITER .pt")


def _uniter_state_dict(path: Path) -> dict:
    """The weights of a UNITER/IAIS-format checkpoint, read by the safe loader, as RetrievalModel weights."""
    from models import ConfigError, load_uniter_checkpoint
    from pipeline.train import safe_load
    saved = safe_load.load(path)
    if not isinstance(saved, dict):
        raise UserError(f"model.init {path}: holds a {type(saved).__name__}, not a UNITER state dict")
    try:
        return load_uniter_checkpoint(saved).state_dict()
    except ConfigError as exc:
        raise UserError(f"model.init {path}: {exc}") from None


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
