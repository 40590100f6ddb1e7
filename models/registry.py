"""Named size presets (models/presets/*.json) and create_model, in the manner of timm's registry."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig
from .retrieval import RetrievalModel

PRESET_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_config(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"model preset {name!r} does not exist: use one of {list_presets()}")
    return json.loads(path.read_text())


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update: nested dicts (e.g. image=dict(mode=...)) are merged, not replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def create_model(name_or_config: str | ModelConfig, **overrides: Any) -> RetrievalModel:
    """create_model("tiny", vocab_size=500, image=dict(mode="features", feat_dim=2048, backbone=None)).

    Overrides merge into the preset recursively. backbone_kwargs belong to their backbone: an override of
    image.backbone drops the preset's backbone_kwargs (give new ones beside it if needed).
    """
    return RetrievalModel(resolve_config(name_or_config, **overrides))


def resolve_config(name_or_config: str | ModelConfig, **overrides: Any) -> ModelConfig:
    base = name_or_config.to_dict() if isinstance(name_or_config, ModelConfig) else preset_config(name_or_config)
    image = overrides.get("image", {})
    if isinstance(image, dict) and "backbone" in image:
        base["image"] = dict(base["image"], backbone_kwargs={})
    return ModelConfig.from_dict(merge(base, overrides))
