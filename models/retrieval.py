"""RetrievalModel: image encoder + UNITER single-stream transformer + heads (the models/ public API)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from .config import ConfigError, ModelConfig
from .embeddings import ImageEmbeddings, TextEmbeddings
from .heads import GroundingHead, ItcHead, MlmHead, MrfrHead, Pooler
from .image_encoder import ImageEncoder, ImageTokens
from .transformer import Encoder

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
Batch = dict[str, torch.Tensor]


@dataclass
class EncoderOutput:
    """Transformer output over `[CLS] w.. [SEP] (text pad) r1..rm (image pad)`, N = T + M.

    attn_logits: layer index (non-negative) -> pre-softmax logits [B, heads, N, N], unmasked.
    attn_mask / word_mask / region_mask: bool [B, N]. text_len: T (0 for an image-only pass).
    """

    sequence: torch.Tensor
    pooled: torch.Tensor
    attn_logits: dict[int, torch.Tensor]
    attn_mask: torch.Tensor
    word_mask: torch.Tensor
    region_mask: torch.Tensor
    text_len: int


def word_mask_of(text_mask: torch.Tensor) -> torch.Tensor:
    """Real tokens except [CLS] (first) and [SEP] (last real token) of each `[CLS] ... [SEP] pad` row."""
    lengths = text_mask.sum(dim=1, keepdim=True)
    idx = torch.arange(text_mask.shape[1], device=text_mask.device)[None]
    return text_mask & (idx > 0) & (idx < lengths - 1)


class RetrievalModel(nn.Module):
    def __init__(self, config: ModelConfig, load_backbone_weights: bool = True):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config.image, load_backbone_weights)
        self.embeddings = TextEmbeddings(config)
        self.img_embeddings = ImageEmbeddings(config, self.image_encoder.feat_dim)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.rank_head = nn.Linear(config.hidden_size, 1)
        self.mlm_head = MlmHead(config, self.embeddings.word_embeddings)
        self.mrfr_head = MrfrHead(config, self.image_encoder.feat_dim)
        self.grounding_head = GroundingHead(config)
        self.itc = ItcHead(config)
        for name, module in self.named_children():
            if name != "image_encoder":  # timm keeps its own initialisation
                module.apply(self._init_weights)
        self.set_grad_checkpointing(config.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing (non-reentrant) of the transformer layers and of a trainable backbone."""
        self.encoder.grad_checkpointing = enable
        self.image_encoder.set_grad_checkpointing(enable)

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.mlm_head.decoder:   # tied to the word embeddings, which keep init_std
            return
        if isinstance(module, nn.Linear) and self.config.linear_init == "fan_in":
            nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- image side -------------------------------------------------------------------------------
    def encode_image(self, batch: Batch) -> ImageTokens:
        """Runs the backbone once; the result can be reused by forward/score for many texts."""
        return self.image_encoder(batch)

    def _image_tokens(self, batch: Batch, image_tokens: ImageTokens | None) -> ImageTokens | None:
        if image_tokens is not None:
            return image_tokens
        if "pixels" in batch or "region_feat" in batch:
            return self.encode_image(batch)
        return None

    # ---- transformer ------------------------------------------------------------------------------
    def forward(self, batch: Batch, image_tokens: ImageTokens | None = None,
                attn_logit_layers: list[int] | None = None, masked_regions: torch.Tensor | None = None
                ) -> EncoderOutput:
        """Text-only if the batch has no image inputs (and no image_tokens), image-only if it has no
        `input_ids`. A side of batch size 1 is broadcast to the other side's batch size.
        ``masked_regions`` [B, M] bool: image tokens whose input feature is masked (MRFR)."""
        tokens = self._image_tokens(batch, image_tokens)
        has_text = "input_ids" in batch
        if not has_text and tokens is None:
            raise ValueError("batch has neither input_ids nor image inputs (pixels / region_feat)")
        parts, masks, word_masks, region_masks = [], [], [], []
        text_size = batch["input_ids"].shape[0] if has_text else 1
        image_size = tokens.mask.shape[0] if tokens is not None else 1
        if 1 not in (text_size, image_size) and text_size != image_size:
            raise ValueError(f"{text_size} texts and {image_size} images: give equal batch sizes, or one of 1")
        size = max(text_size, image_size)
        if has_text:
            ids = batch["input_ids"].expand(size, -1)
            text_mask = batch["text_mask"].bool().expand(size, -1)
            parts.append(self.embeddings(ids))
            masks.append(text_mask)
            word_masks.append(word_mask_of(text_mask))
            region_masks.append(torch.zeros_like(text_mask))
        if tokens is not None:
            if tokens.mask.shape[0] != size:
                tokens = tokens.expand(size)
                masked_regions = None if masked_regions is None else masked_regions.expand(size, -1)
            parts.append(self.img_embeddings(tokens.feat, tokens.pos, self.embeddings.image_type(), masked_regions))
            masks.append(tokens.mask)
            word_masks.append(torch.zeros_like(tokens.mask))
            region_masks.append(tokens.mask)
        attn_mask = torch.cat(masks, dim=1)
        layers = self.config.logit_layer_indices(attn_logit_layers)
        sequence, logits = self.encoder(torch.cat(parts, dim=1), attn_mask, layers)
        return EncoderOutput(sequence=sequence, pooled=self.pooler(sequence), attn_logits=logits,
                             attn_mask=attn_mask, word_mask=torch.cat(word_masks, dim=1),
                             region_mask=torch.cat(region_masks, dim=1),
                             text_len=batch["input_ids"].shape[1] if has_text else 0)

    # ---- heads ------------------------------------------------------------------------------------
    def score(self, batch: Batch, image_tokens: ImageTokens | None = None) -> torch.Tensor:
        """Pre-sigmoid rank logit [B] of each (text, image) pair."""
        out = self.forward(batch, image_tokens, attn_logit_layers=[])
        return self.rank_head(out.pooled).squeeze(-1)

    def itm_logits(self, batch: Batch, image_tokens: ImageTokens | None = None) -> torch.Tensor:
        out = self.forward(batch, image_tokens, attn_logit_layers=[])
        return self.itm_head(out.pooled)

    def mlm_logits(self, sequence: torch.Tensor, positions_mask: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [K, V] at the K positions where positions_mask [B, N'] is True (N' <= N)."""
        hidden = sequence[:, :positions_mask.shape[1]][positions_mask.bool()]
        return self.mlm_head(hidden)

    def mrfr_predictions(self, out: EncoderOutput, region_positions: torch.Tensor) -> torch.Tensor:
        """Predicted raw image features [K, D_img] of the K image tokens where region_positions [B, M] is True
        (image token m sits at sequence position text_len + m)."""
        hidden = out.sequence[:, out.text_len:out.text_len + region_positions.shape[1]][region_positions.bool()]
        return self.mrfr_head(hidden)

    def grounding_predictions(self, sequence: torch.Tensor, word_positions: torch.Tensor) -> torch.Tensor:
        """Predicted normalised object centres [K, 2] of the K text tokens where word_positions [B, T] is True."""
        return self.grounding_head(sequence[:, :word_positions.shape[1]][word_positions.bool()])

    def embed_text(self, batch: Batch) -> torch.Tensor:
        """L2-normalised ITC embedding [B, itc_dim] from [CLS] of a text-only pass."""
        text_batch = {"input_ids": batch["input_ids"], "text_mask": batch["text_mask"]}
        out = self.forward(text_batch, attn_logit_layers=[])
        return self.itc.text(out.sequence[:, 0])

    def embed_image(self, batch: Batch, image_tokens: ImageTokens | None = None) -> torch.Tensor:
        """L2-normalised ITC embedding [B, itc_dim] from the mean image token of an image-only pass."""
        tokens = image_tokens if image_tokens is not None else self.encode_image(batch)
        out = self.forward({}, tokens, attn_logit_layers=[])
        weights = out.region_mask.to(out.sequence.dtype).unsqueeze(-1)
        mean = (out.sequence * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.itc.image(mean)

    def itc_logits(self, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled similarities [n_text, n_image] of ITC embeddings."""
        return self.itc(text_emb, image_emb)

    @torch.no_grad()
    def init_rank_from_itm(self) -> None:
        """rank <- ITM "match" row (UNITER's init_output). Plain copies, so a ZeRO-3 caller can wrap
        this in deepspeed.zero.GatheredParameters([itm_head/rank_head params], modifier_rank=0)."""
        self.rank_head.weight.copy_(self.itm_head.weight[1:2])
        self.rank_head.bias.copy_(self.itm_head.bias[1:2])

    # ---- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + model.safetensors (the tied MLM decoder is stored once, as the word embeddings)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_model(self, str(directory / WEIGHTS_NAME))

    @staticmethod
    def is_pretrained_dir(directory: str | Path) -> bool:
        """Whether ``directory`` holds what :meth:`save_pretrained` writes."""
        directory = Path(directory)
        return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "RetrievalModel":
        """Rebuilds from config.json (backbone_file is not read: all weights come from the safetensors).
        A bad config.json or weights file is a ConfigError naming the file."""
        directory = Path(directory)
        model = cls(read_model_config(directory / CONFIG_NAME), load_backbone_weights=False)
        weights = directory / WEIGHTS_NAME
        try:
            load_model(model, str(weights), strict=True)
        except SafetensorError as exc:
            raise ConfigError(f"{weights}: not a readable safetensors file ({exc})") from None
        except RuntimeError as exc:   # safetensors' strict key check
            raise ConfigError(f"{weights}: its weights do not match {CONFIG_NAME} ({_first_line(exc)})") from None
        return model


def read_model_config(file: Path) -> ModelConfig:
    """The ModelConfig of a config.json; anything wrong with the file is a ConfigError naming it."""
    try:
        return ModelConfig.from_dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: unreadable ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    except TypeError as exc:   # a field of the wrong type reaching the dataclass
        raise ConfigError(f"{file}: {exc}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
