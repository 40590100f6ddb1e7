"""Output heads: pooler, ITM / rank, MLM (decoder tied to the word embeddings), MRFR, grounding, ITC
projections."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .embeddings import LN_EPS


class Pooler(nn.Module):
    """dense + tanh on the first ([CLS]) token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(sequence[:, 0]))


class MlmHead(nn.Module):
    """BERT LM head: dense + gelu + LayerNorm, then a decoder sharing the word-embedding matrix, + bias."""

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # one Parameter owned by both modules (ZeRO-3 safe)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden)))) + self.bias


class MrfrHead(nn.Module):
    """Masked region feature regression (UNITER's MRFR): dense + gelu + LayerNorm, then back to the
    image-feature size, predicting the raw feature of a masked region from its output token."""

    def __init__(self, cfg: ModelConfig, feat_dim: int):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.out = nn.Linear(cfg.hidden_size, feat_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(F.gelu(self.dense(hidden))))


class GroundingHead(nn.Module):
    """Supervised grounding: a word's output token -> the normalised (x, y) centre of the object it names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.out = nn.Linear(cfg.hidden_size, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.norm(F.gelu(self.dense(hidden)))))


class ItcHead(nn.Module):
    """Projections for the dual-encoder (ITC) embeddings and the learnable temperature."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.itc_dim)
        self.image_proj = nn.Linear(cfg.hidden_size, cfg.itc_dim)
        # shape [1], not a 0-dim scalar: DeepSpeed views parameters as flat byte buffers (fails on 0-dim)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))

    def text(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(cls_hidden), dim=-1)

    def image(self, mean_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(mean_hidden), dim=-1)

    def forward(self, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """Similarity logits [n_text, n_image] = exp(logit_scale) * t @ i^T, scale capped at 100 (CLIP)."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * text_emb @ image_emb.t()
