"""Start-up checks of the shard specs a config names: they exist (a remote spec's manifest is read now) and
hold samples, unless the synthetic dataset will be built into them."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import braceexpand

from pipeline.config import ExperimentConfig, SyntheticConfig, is_remote, resolve_path, split_path
from pipeline.data.shards import read_manifest, resolve_shards, verify_local_shards
from pipeline.errors import UserError


def check_shards_exist(spec: str, field_name: str) -> None:
    """UserError unless ``spec`` (directory, manifest, tar or brace pattern; or a URL / pipe: spec, whose
    manifest is read now) names existing shards; local tars must also be non-empty and agree with their
    manifest (``verify_local_shards``: the rule for when they are counted)."""
    if is_remote(spec):
        try:
            shards = resolve_shards(spec)
        except UserError as exc:
            raise UserError(f"config '{field_name}' = {spec}: {exc}") from None
        if not shards:
            raise UserError(f"config '{field_name}' = {spec}: its manifest lists no shards; rewrite the split")
        return
    path = resolve_path(spec)
    _check_local_shards_named(spec, path, field_name)
    try:
        verify_local_shards(str(path))
    except UserError as exc:
        raise UserError(f"config '{field_name}' = {spec}: {exc}") from None


def _check_local_shards_named(spec: str, path: Path, field_name: str) -> None:
    if path.is_dir():
        if not (path / "manifest.json").is_file() and not any(path.glob("*.tar")):
            raise UserError(f"config '{field_name}' = {spec}: the directory holds no manifest.json or .tar shards")
        return
    if "{" in spec:
        missing = [p for p in braceexpand.braceexpand(str(path)) if not Path(p).is_file()]
        if missing:
            raise UserError(f"config '{field_name}' = {spec}: shard {missing[0]} does not exist "
                            f"({len(missing)} missing); check the path or build the shards first")
        return
    if not path.is_file():
        raise UserError(f"config '{field_name}' = {spec}: no such shard directory, manifest or tar file")


def check_split_not_empty(spec: str, split: str, field_name: str) -> None:
    """UserError when the manifest of local shards ``spec`` lists no samples (reading an empty split fails
    only when it is first used: validation mid-training, the test split after all training)."""
    if is_remote(spec):
        return
    path = resolve_path(spec)
    manifest = path / "manifest.json" if path.is_dir() else path
    if manifest.suffix != ".json" or not manifest.is_file():
        return   # tar files or a brace pattern: no manifest to count from
    if read_manifest(manifest)["samples"] == 0:
        raise UserError(f"config '{field_name}' = {spec}: the {split} split is empty ({manifest} lists 0 samples); "
                        f"write it with samples (launch/make_shards.py) or point to another split")


def _check_synthetic_split(synthetic: SyntheticConfig, split: str) -> None:
    if synthetic.count(split) == 0:
        raise UserError(f"config 'data.synthetic.{split}' = 0: the {split} split would be empty; give it images"
                        + (" (or set eval.test=false)" if split == "test" else ""))


def validate_paths(cfg: ExperimentConfig, stage: Literal["pretrain", "finetune"]) -> None:
    """Shard paths must exist, and hold samples, unless the synthetic dataset will be built into them."""
    builds = cfg.data.synthetic is not None
    if stage == "pretrain" and cfg.pretrain.sources:
        for i, s in enumerate(cfg.pretrain.sources):
            check_shards_exist(s.shards, f"pretrain.sources[{i}].shards")
            check_split_not_empty(s.shards, "train", f"pretrain.sources[{i}].shards")
    splits = ["train"] if stage == "pretrain" and not cfg.pretrain.sources else []
    if stage == "finetune":
        splits = ["train", "val"] + (["test"] if cfg.eval.test else [])
    for split in splits:
        spec = split_path(cfg, split)
        if spec is None:
            raise UserError(f"config 'data.{split}' is not set; give the {split} shards (or data.root)")
        if builds and getattr(cfg.data, split) is None:
            _check_synthetic_split(cfg.data.synthetic, split)
            continue
        field_name = f"data.{split}" if getattr(cfg.data, split) else f"data.root ({split}/)"
        check_shards_exist(spec, field_name)
        check_split_not_empty(spec, split, field_name)
    if cfg.data.tokenizer and not resolve_path(cfg.data.tokenizer).is_file():
        raise UserError(f"config 'data.tokenizer' = {cfg.data.tokenizer}: no such file; give a .model or vocab .txt")
    if cfg.data.relations:
        check_shards_exist(cfg.data.relations, "data.relations")
    if cfg.model.init and not cfg.model.pretrain_config:
        check_init_checkpoint(cfg.model.init)


def check_init_checkpoint(init: str) -> None:
    """UserError unless ``model.init`` looks like what build loads: a save_pretrained directory, a DeepSpeed
    checkpoint directory whose ``latest`` names an existing tag, or a UNITER-format .pt/.bin file."""
    path = resolve_path(init)
    if not path.exists():
        raise UserError(f"config 'model.init' = {init}: no such checkpoint or save_pretrained directory")
    if path.is_file():
        if path.suffix not in (".pt", ".bin"):
            raise UserError(f"config 'model.init' = {init}: a file, but not a UNITER-format .pt/.bin checkpoint; "
                            f"give a save_pretrained directory, a DeepSpeed checkpoint directory or a .pt file")
        return
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return
    latest = path / "latest"
    if not latest.is_file():
        raise UserError(f"config 'model.init' = {init}: neither a save_pretrained directory (config.json + "
                        f"model.safetensors) nor a DeepSpeed checkpoint directory (with a 'latest' file)")
    tag = latest.read_text(errors="replace").strip()
    if not tag or not (path / tag).is_dir():
        raise UserError(f"config 'model.init' = {init}: its 'latest' names tag {tag!r} but {path / tag} does not "
                        f"exist; give a complete checkpoint directory")
