"""BERT encoder, post-LN (UNITER) or pre-LN (ViT/ViLT): SDPA attention, or explicit attention that also returns
pre-softmax logits."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .embeddings import LN_EPS


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.dropout = cfg.dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, with_logits: bool):
        """x [B,N,H], mask bool [B,N] (True = attend to this key).

        Returns (context [B,N,H], logits [B,heads,N,N] or None). The logits are Q K^T / sqrt(d) with no
        padding mask applied: the mask only enters the softmax (callers mask by word/region masks).
        """
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        p = self.dropout if self.training else 0.0
        key_mask = mask[:, None, None, :]
        if with_logits:
            logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            probs = logits.masked_fill(~key_mask, torch.finfo(logits.dtype).min).softmax(dim=-1)
            ctx = torch.matmul(F.dropout(probs, p, self.training), v)
        else:
            logits = None
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        b, _, n, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, n, -1), logits


class EncoderLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + drop(W_o attn(x))); x = LN(x + drop(W_2 gelu(W_1 x))).
    Pre-LN (``cfg.norm == "pre"``): x = x + drop(W_o attn(LN(x))); x = x + drop(W_2 gelu(W_1 LN(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.attention = SelfAttention(cfg)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=LN_EPS)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.dropout)
        self.pre_norm = cfg.norm == "pre"

    def forward(self, x: torch.Tensor, mask: torch.Tensor, with_logits: bool = False):
        if self.pre_norm:
            ctx, logits = self.attention(self.attn_norm(x), mask, with_logits)
            x = x + self.dropout(self.attn_out(ctx))
            return x + self.dropout(self._ffn(self.ffn_norm(x))), logits
        ctx, logits = self.attention(x, mask, with_logits)
        x = self.attn_norm(x + self.dropout(self.attn_out(ctx)))
        x = self.ffn_norm(x + self.dropout(self._ffn(x)))
        return x, logits

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_out(F.gelu(self.ffn_in(x)))  # erf GELU, as BERT/UNITER


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        # pre-LN layers leave the residual stream unnormalised: one LayerNorm after the last (ViT)
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS) if cfg.norm == "pre" else nn.Identity()
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, x: torch.Tensor, mask: torch.Tensor, logit_layers: list[int]):
        """Returns (hidden [B,N,H], {layer index: pre-softmax logits [B,heads,N,N]})."""
        logits = {}
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            with_logits = i in logit_layers
            if use_ckpt:
                x, layer_logits = checkpoint(layer, x, mask, with_logits, use_reentrant=False)
            else:
                x, layer_logits = layer(x, mask, with_logits)
            if with_logits:
                logits[i] = layer_logits
        return self.final_norm(x), logits
