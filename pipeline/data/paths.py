"""Start-up checks of the shard specs a config names: they exist (a remote spec's manifest is read now) and
hold samples, unless the synthetic dataset will be built into them."""
from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Literal, Optional

import braceexpand
import numpy as np
import webdataset as wds

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


def validate_paths(cfg: ExperimentConfig, stage: Literal["pretrain", "finetune"],
                   feat_dim: Optional[int] = None) -> None:
    """Shard paths must exist, and hold samples, unless the synthetic dataset will be built into them; the
    training shards' first samples must fit the image mode and ``feat_dim`` (:func:`check_samples_fit`)."""
    builds = cfg.data.synthetic is not None
    if stage == "pretrain" and cfg.pretrain.sources:
        for i, s in enumerate(cfg.pretrain.sources):
            if not s.shards.strip():
                raise UserError(f"config 'pretrain.sources[{i}].shards' is not set; give the source's shards "
                                f"(a directory, manifest, tar, brace pattern or URL)")
            check_shards_exist(s.shards, f"pretrain.sources[{i}].shards")
            check_split_not_empty(s.shards, "train", f"pretrain.sources[{i}].shards")
            check_samples_fit(s.shards, f"pretrain.sources[{i}].shards", cfg.data.image_mode, feat_dim)
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
        if split == "train":
            check_samples_fit(spec, field_name, cfg.data.image_mode, feat_dim)
    if cfg.data.tokenizer and not resolve_path(cfg.data.tokenizer).is_file():
        raise UserError(f"config 'data.tokenizer' = {cfg.data.tokenizer}: no such file; give a .model or vocab .txt")
    if cfg.data.relations:
        check_shards_exist(cfg.data.relations, "data.relations")
    if cfg.model.init and not cfg.model.pretrain_config:
        check_init_checkpoint(cfg.model.init)


FIRST_SAMPLES = 8   # read at start-up; one corrupt sample among them is the loader's counted skip, not a refusal


def check_samples_fit(spec: str, field_name: str, image_mode: str, feat_dim: Optional[int]) -> None:
    """UserError when none of the first samples of local shards ``spec`` can feed the model: no image member
    in patch/roi mode, no ``.npz`` in features mode, or region features all of another width than
    ``model.image.feat_dim``. Otherwise every sample would be skipped, and the run would end only when the
    loader found nothing left to decode."""
    if is_remote(spec):
        return
    from pipeline.data.decode import IMAGE_EXTS, SkipCounter, tar_samples
    shards = resolve_shards(str(resolve_path(spec)))
    pipe = wds.DataPipeline(wds.SimpleShardList([s.url for s in shards[:1]]), *tar_samples(SkipCounter()))
    samples = list(itertools.islice(pipe, FIRST_SAMPLES))
    if not samples:
        return   # an unreadable first shard is the loader's counted skip
    where = f"config '{field_name}' = {spec}: its first {len(samples)} sample(s) (from {shards[0].url})"
    if image_mode == "features":
        if not any("npz" in s for s in samples):
            raise UserError(f"{where} hold no .npz region features, but data.image_mode is features: make the "
                            f"shards with launch/make_shards.py --features, or set data.image_mode to patch or roi")
        widths = {w for w in map(_feature_width, (s["npz"] for s in samples if "npz" in s)) if w is not None}
        if feat_dim is not None and widths and feat_dim not in widths:
            raise UserError(f"{where} hold {'/'.join(map(str, sorted(widths)))}-d region features, but "
                            f"model.image.feat_dim is {feat_dim}: set model.overrides.image.feat_dim to "
                            f"their width, or extract the features at {feat_dim}-d")
    elif not any(ext in s for s in samples for ext in IMAGE_EXTS):
        raise UserError(f"{where} hold no image ({', '.join(IMAGE_EXTS)}), but data.image_mode is {image_mode}: "
                        f"for region-feature shards set data.image_mode=features")


def _feature_width(data: bytes) -> Optional[int]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            features = z["features"]
            return int(features.shape[1]) if features.ndim == 2 else None
    except (OSError, ValueError, KeyError, EOFError):
        return None   # the loader counts it as bad_npz


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
