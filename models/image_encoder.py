"""Image side: timm backbone -> patch tokens, RoI-pooled regions, or precomputed region features."""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn
from torchvision.ops import roi_align

from .config import ConfigError, ImageEncoderConfig

ROI_OUTPUT_SIZE = 2  # roi_align bins per side, averaged into one vector per region


@dataclass
class ImageTokens:
    """Raw image tokens before the transformer's image embedding.

    feat [B, M, D_img] backbone/region features; pos [B, M, 7] normalised boxes
    (x1, y1, x2, y2, w, h, w*h); mask bool [B, M] (True = real token).
    """

    feat: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor

    def expand(self, batch_size: int) -> "ImageTokens":
        return ImageTokens(self.feat.expand(batch_size, -1, -1), self.pos.expand(batch_size, -1, -1),
                           self.mask.expand(batch_size, -1))


def box_features(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Pixel boxes [..., 4] (x1, y1, x2, y2) -> the 7-d normalised position feature [..., 7]."""
    scale = boxes.new_tensor([width, height, width, height])
    x1, y1, x2, y2 = (boxes / scale).clamp(0.0, 1.0).unbind(-1)
    w, h = x2 - x1, y2 - y1
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1)


def grid_box_features(rows: int, cols: int, device=None, dtype=None) -> torch.Tensor:
    """The 7-d box of every cell of a rows x cols grid, row-major: [rows * cols, 7]."""
    ys = torch.arange(rows, device=device, dtype=dtype)
    xs = torch.arange(cols, device=device, dtype=dtype)
    y1, x1 = torch.meshgrid(ys / rows, xs / cols, indexing="ij")
    y1, x1 = y1.reshape(-1), x1.reshape(-1)
    w = torch.full_like(x1, 1.0 / cols)
    h = torch.full_like(y1, 1.0 / rows)
    return torch.stack([x1, y1, x1 + w, y1 + h, w, h, w * h], dim=-1)


def _timm_model(name: str, image_size: int, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:  # CNNs take any input size and have no img_size argument
        return timm.create_model(name, **kwargs)


def create_backbone(cfg: ImageEncoderConfig, load_weights: bool = True) -> nn.Module:
    """A timm model without classifier; pretrained weights only from cfg.backbone_file (never fetched)."""
    use_file = load_weights and cfg.backbone_file is not None
    kwargs = dict(cfg.backbone_kwargs, pretrained=use_file, num_classes=0)
    if use_file:
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.backbone_file)
    try:
        return _timm_model(cfg.backbone, cfg.image_size, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.image.backbone_kwargs={cfg.backbone_kwargs}: {cfg.backbone} rejects them "
                          f"({exc})") from exc
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"model.image.backbone={cfg.backbone!r}: not a timm model name "
                              "(see timm.list_models())") from exc
        raise


class ImageEncoder(nn.Module):
    """Turns the image part of a batch into ImageTokens; holds the timm backbone (None in features mode)."""

    def __init__(self, cfg: ImageEncoderConfig, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = None if cfg.mode == "features" else create_backbone(cfg, load_weights)
        if self.backbone is None:
            self.feat_dim = cfg.feat_dim
        else:
            self.feat_dim = self.backbone.num_features
            if cfg.feat_dim is not None and cfg.feat_dim != self.feat_dim:
                raise ConfigError(f"model.image.feat_dim={cfg.feat_dim} but {cfg.backbone} gives "
                                  f"{self.feat_dim}-d features: set feat_dim to {self.feat_dim} or null")
            self.backbone.requires_grad_(cfg.trainable)
            # Call the backbone as a module (so ZeRO-3 hooks gather its own parameters, e.g. a ViT's
            # pos_embed) but have that call run forward_features: no pooling, no classifier.
            self.backbone.forward = self.backbone.forward_features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own activation checkpointing of a trainable backbone (where the model supports it)."""
        if self.backbone is None or not self.cfg.trainable:
            return
        try:
            self.backbone.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError):  # timm's answer for models without it
            pass

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if self.backbone is not None and not self.cfg.trainable:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics and no dropout
        return self

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone output as a [B, C, h, w] map (prefix tokens removed, NHWC turned to NCHW)."""
        pixels = pixels.to(next(self.backbone.parameters()).dtype)
        with torch.set_grad_enabled(self.cfg.trainable and torch.is_grad_enabled()):
            out = self.backbone(pixels)
        if out.dim() == 3:  # token sequence (ViT family)
            tokens = out[:, self.backbone.num_prefix_tokens:]
            rows, cols = self._token_grid(pixels, tokens.shape[1])
            return tokens.transpose(1, 2).reshape(out.shape[0], -1, rows, cols)
        if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":  # Swin and friends
            return out.permute(0, 3, 1, 2)
        return out

    def _token_grid(self, pixels: torch.Tensor, num_tokens: int) -> tuple[int, int]:
        reduction = self._reduction()
        rows, cols = pixels.shape[-2] // reduction, pixels.shape[-1] // reduction
        if rows * cols != num_tokens:
            raise ValueError(f"{self.cfg.backbone} returned {num_tokens} patch tokens for a "
                             f"{tuple(pixels.shape[-2:])} image, expected a {rows}x{cols} grid")
        return rows, cols

    def _reduction(self) -> int:
        """Input pixels per output token along a side. A ViT without blocks (depth 0: a patch embedding)
        lists no feature_info; its patch embedding knows the ratio."""
        if self.backbone.feature_info:
            return self.backbone.feature_info[-1]["reduction"]
        ratio = self.backbone.patch_embed.feat_ratio()
        return ratio if isinstance(ratio, int) else ratio[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> ImageTokens:
        mode = self.cfg.mode
        if mode == "features":
            return ImageTokens(batch["region_feat"], batch["region_pos"], batch["region_mask"].bool())
        fmap = self.feature_map(batch["pixels"])
        if mode == "patch":
            return self._patches(fmap)
        return self._regions(fmap, batch)

    def _patches(self, fmap: torch.Tensor) -> ImageTokens:
        b, _, rows, cols = fmap.shape
        feat = fmap.flatten(2).transpose(1, 2)
        pos = grid_box_features(rows, cols, fmap.device).expand(b, -1, -1)
        mask = torch.ones(b, rows * cols, dtype=torch.bool, device=fmap.device)
        return ImageTokens(feat, pos, mask)

    def _regions(self, fmap: torch.Tensor, batch: dict[str, torch.Tensor]) -> ImageTokens:
        pixels, boxes = batch["pixels"], batch["boxes"]
        b, m, _ = boxes.shape
        height, width = pixels.shape[-2:]
        # the map covers the whole image, so its scale is the ratio of sizes (reduction factor^-1)
        scale = fmap.shape[-1] / width
        # fp32: torchvision's roi_align kernels do not all take bf16
        pooled = roi_align(fmap.float(), list(boxes.float().unbind(0)), ROI_OUTPUT_SIZE,
                           spatial_scale=scale, sampling_ratio=2, aligned=True)
        feat = pooled.mean(dim=(2, 3)).reshape(b, m, -1).to(fmap.dtype)
        pos = batch.get("region_pos")
        if pos is None:
            pos = box_features(boxes.float(), float(width), float(height)).to(feat.dtype)
        mask = batch.get("region_mask")
        mask = torch.ones(b, m, dtype=torch.bool, device=feat.device) if mask is None else mask.bool()
        return ImageTokens(feat, pos, mask)
