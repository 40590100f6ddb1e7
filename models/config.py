"""Typed, validated model configuration (JSON-serialisable)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

IMAGE_MODES = ("patch", "roi", "features")


class ConfigError(ValueError):
    """Invalid model configuration; the message is one line naming the field, the value and the fix."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _strict_kwargs(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    _check(isinstance(data, dict), f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return dict(data)


@dataclass
class ImageEncoderConfig:
    """How images become tokens.

    mode: "patch" (timm backbone patch tokens), "roi" (boxes pooled from the backbone feature map with
    roi_align) or "features" (precomputed region features, no backbone).
    backbone: timm model name (patch/roi). backbone_file: local pretrained weights for it, or None for a
    random init (nothing is ever downloaded). feat_dim: raw feature size; required in features mode,
    taken from the backbone otherwise (if given it must match). image_size: side of the square input
    image, also passed to timm as img_size for models that take one (ViT, Swin, ...).
    """

    mode: str = "patch"
    backbone: str | None = "test_vit"
    backbone_file: str | None = None
    trainable: bool = True
    feat_dim: int | None = None
    image_size: int = 96
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.mode in IMAGE_MODES, f"model.image.mode={self.mode!r}: use one of {list(IMAGE_MODES)}")
        if self.mode == "features":
            _check(isinstance(self.feat_dim, int) and self.feat_dim > 0,
                   f"model.image.feat_dim={self.feat_dim!r}: features mode needs the region feature size "
                   "(a positive int, e.g. 2048)")
        else:
            _check(isinstance(self.backbone, str) and bool(self.backbone),
                   f"model.image.backbone={self.backbone!r}: {self.mode} mode needs a timm model name")
            _check(self.feat_dim is None or (isinstance(self.feat_dim, int) and self.feat_dim > 0),
                   f"model.image.feat_dim={self.feat_dim!r}: give a positive int or null")
        _check(isinstance(self.image_size, int) and self.image_size >= 16,
               f"model.image.image_size={self.image_size!r}: give an int >= 16")
        _check(isinstance(self.backbone_kwargs, dict),
               f"model.image.backbone_kwargs={self.backbone_kwargs!r}: give a JSON object")
        reserved = sorted(set(self.backbone_kwargs) & {"pretrained", "pretrained_cfg_overlay", "num_classes",
                                                       "img_size"})
        _check(not reserved,
               f"model.image.backbone_kwargs sets {reserved}: use backbone_file / image_size instead")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageEncoderConfig":
        return cls(**_strict_kwargs(cls, data, "model.image"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NORM_POSITIONS = ("post", "pre")
LINEAR_INITS = ("normal", "fan_in")


@dataclass
class ModelConfig:
    """Size and behaviour of the single-stream transformer and its heads.

    attn_logit_layers: layers (negative = from the end) whose attention is computed explicitly so their
    pre-softmax logits can be returned (IAIS/ISD); every other layer uses SDPA.
    linear_init: "normal" draws every Linear and Embedding weight from N(0, init_std) (BERT/UNITER, whose 0.02
    suits hidden size 768); "fan_in" draws Linear weights from N(0, 1/fan_in) (LeCun) and keeps init_std for
    the embeddings; with 0.02 on every layer the hidden-128 tiny model learnt no relations (README "Models").
    """

    vocab_size: int = 1000
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512
    max_text_len: int = 40
    dropout: float = 0.1
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    attn_logit_layers: list[int] = field(default_factory=lambda: [-1])
    grad_checkpointing: bool = False
    itc_dim: int = 128
    init_std: float = 0.02
    norm: str = "post"   # "post": UNITER/BERT layers (what UNITER checkpoints hold); "pre": ViT/ViLT layers
    linear_init: str = "normal"

    def __post_init__(self) -> None:
        if isinstance(self.image, dict):
            self.image = ImageEncoderConfig.from_dict(self.image)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_text_len", "itc_dim"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                   f"model.{name}={value!r}: give a positive int")
        _check(self.hidden_size % self.num_heads == 0,
               f"model.hidden_size={self.hidden_size} is not a multiple of model.num_heads={self.num_heads}: "
               "change one of them")
        _check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
               f"model.dropout={self.dropout!r}: give a float in [0, 1)")
        _check(isinstance(self.init_std, (int, float)) and self.init_std > 0,
               f"model.init_std={self.init_std!r}: give a positive float")
        _check(self.norm in NORM_POSITIONS, f"model.norm={self.norm!r}: give one of {', '.join(NORM_POSITIONS)}")
        _check(self.linear_init in LINEAR_INITS,
               f"model.linear_init={self.linear_init!r}: give one of {', '.join(LINEAR_INITS)}")
        self.attn_logit_layers = list(self.attn_logit_layers)
        for layer in self.attn_logit_layers:
            _check(isinstance(layer, int) and -self.num_layers <= layer < self.num_layers,
                   f"model.attn_logit_layers contains {layer!r}: layers are -{self.num_layers}.."
                   f"{self.num_layers - 1} for num_layers={self.num_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def logit_layer_indices(self, layers: list[int] | None = None) -> list[int]:
        """Non-negative, sorted, unique indices of `layers` (default: the configured attn_logit_layers)."""
        layers = self.attn_logit_layers if layers is None else list(layers)
        for layer in layers:
            _check(-self.num_layers <= layer < self.num_layers,
                   f"attn_logit_layers contains {layer}: valid layers are -{self.num_layers}.."
                   f"{self.num_layers - 1}")
        return sorted({layer % self.num_layers for layer in layers})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        kwargs = _strict_kwargs(cls, data, "model")
        if "image" in kwargs:
            kwargs["image"] = ImageEncoderConfig.from_dict(kwargs["image"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
