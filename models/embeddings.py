"""UNITER input embeddings for text tokens and image tokens."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig

LN_EPS = 1e-12
TEXT_TYPE, IMAGE_TYPE = 0, 1


class TextEmbeddings(nn.Module):
    """word + position + token type, LayerNorm, dropout (BERT/UNITER)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(2, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {length} tokens is longer than model max_text_len="
                             f"{self.position_embeddings.num_embeddings}: truncate it in the tokenizer")
        positions = torch.arange(length, device=input_ids.device)
        types = torch.full_like(positions, TEXT_TYPE)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(types))
        return self.dropout(self.norm(x))

    def image_type(self) -> torch.Tensor:
        """The token-type embedding [H] of image tokens (UNITER shares the text table, type id 1).

        Called as a module (not by indexing .weight) so ZeRO-3 gathers the table for it.
        """
        device = self.token_type_embeddings.weight.device
        return self.token_type_embeddings(torch.tensor(IMAGE_TYPE, device=device))


class ImageEmbeddings(nn.Module):
    """UNITER's image embedding: LN(linear(feat)) + LN(linear(pos7)) + type, LayerNorm, dropout."""

    def __init__(self, cfg: ModelConfig, feat_dim: int):
        super().__init__()
        self.img_linear = nn.Linear(feat_dim, cfg.hidden_size)
        self.img_norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.pos_linear = nn.Linear(7, cfg.hidden_size)
        self.pos_norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.dropout)
        # the input feature of a region masked for MRFR (UNITER: zeroed feature + mask_embedding row 1). It must
        # not be all zeros: img_norm would then normalise a zero-variance vector and its gradient would be
        # scaled by 1/sqrt(eps)
        self.mask_feature = nn.Parameter(torch.randn(feat_dim) * cfg.init_std)

    def forward(self, feat: torch.Tensor, pos: torch.Tensor, type_embedding: torch.Tensor,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        """``masked`` [B, M] (optional): regions whose feature is replaced by the learned mask feature."""
        dtype = self.img_linear.weight.dtype
        feat = feat.to(dtype)
        if masked is not None:
            feat = torch.where(masked.bool().unsqueeze(-1), self.mask_feature.to(dtype), feat)
        x = (self.img_norm(self.img_linear(feat)) + self.pos_norm(self.pos_linear(pos.to(dtype)))
             + type_embedding)
        return self.dropout(self.norm(x))
