"""Hard negatives from a candidate pool fed by the stream (shards have no random access).

The pool holds the last ``capacity`` batches the training loop consumed (the current one included). Its
content is a pure function of the loader position, so a resumed run refills it by replaying those batches
(see ``pipeline.data.loader.BatchStream.history``) and mines exactly the negatives an uninterrupted run would.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from models.image_encoder import ImageTokens
from pipeline.errors import UserError

IMAGE_KEYS = ("pixels", "boxes", "region_feat", "region_pos", "region_mask")
TEXT_KEYS = ("input_ids", "text_mask", "word_index", "word_to_region")


def pad_cat(tensors: list[torch.Tensor], value=0) -> torch.Tensor:
    """Concatenate along dim 0, padding dim 1 (sequence / region count) to the longest."""
    if tensors[0].dim() < 2:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        if t.shape[1] < width:
            pad = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), value)
            t = torch.cat([t, pad], dim=1)
        out.append(t)
    return torch.cat(out)


def _pad_value(key: str):
    return -1 if key in ("word_index", "word_to_region") else 0


def take(batches: list[dict], keys: tuple[str, ...], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``index`` (into the concatenation of ``batches``) of the given keys that the batches have."""
    out = {}
    for key in keys:
        if key in batches[0]:
            out[key] = pad_cat([b[key] for b in batches], _pad_value(key))[index]
    return out


class CandidatePool:
    def __init__(self, capacity_batches: int):
        self.batches: deque[dict] = deque(maxlen=max(1, capacity_batches))

    def add(self, batch: dict) -> None:
        self.batches.append({k: v.detach().cpu() for k, v in batch.items() if torch.is_tensor(v)})

    def __len__(self) -> int:
        return sum(b["image_id"].shape[0] for b in self.batches)

    def draw_per_anchor(self, anchor_ids: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """Pool rows [A, n]: for each anchor its own ``n`` distinct random candidates of another image id
        (the authors draw fresh random negatives per anchor). One random key per (anchor, row); rows of
        the anchor's own image get key 2 and are never among the ``n`` smallest while enough others exist."""
        ids = self.image_ids()
        valid = candidate_valid(anchor_ids.cpu(), ids)
        short = int((valid.sum(1) < n).sum())
        if short:
            raise UserError(f"the hard-negative pool holds {len(ids)} candidates, fewer than "
                            f"finetune.negative_size ({n}) with another image id for {short} anchor(s): raise "
                            f"finetune.pool_size or lower finetune.negative_size")
        keys = torch.rand(valid.shape, generator=generator).masked_fill_(~valid, 2.0)
        return keys.topk(n, dim=1, largest=False, sorted=False).indices

    def image_ids(self) -> torch.Tensor:
        return torch.cat([b["image_id"] for b in self.batches])

    def images(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return take(list(self.batches), IMAGE_KEYS, index)

    def texts(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return take(list(self.batches), TEXT_KEYS, index)


def index_tokens(tokens: ImageTokens, index: torch.Tensor) -> ImageTokens:
    return ImageTokens(tokens.feat[index], tokens.pos[index], tokens.mask[index])


def text_rows(texts: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in texts.items()}


@torch.no_grad()
def score_grid(score_fn: Callable[[dict, ImageTokens], torch.Tensor], texts: dict, tokens: ImageTokens,
               text_idx: torch.Tensor, image_idx: torch.Tensor, chunk: int) -> torch.Tensor:
    """Scores of the pairs (texts[text_idx[a, c]], tokens[image_idx[a, c]]) -> [A, C].

    The number of ``score_fn`` calls depends only on the grid shape, so ranks with equal shapes make equal
    numbers of calls (ZeRO-3 gathers parameters collectively in every forward).
    """
    flat_t, flat_i = text_idx.reshape(-1), image_idx.reshape(-1)
    out = []
    for s in range(0, flat_t.numel(), chunk):
        t, i = flat_t[s:s + chunk], flat_i[s:s + chunk]
        out.append(score_fn(text_rows(texts, t), index_tokens(tokens, i)).float())
    return torch.cat(out).view(text_idx.shape)


def margin_rank_loss(pos: torch.Tensor, neg: torch.Tensor, margin: float) -> torch.Tensor:
    """mean_k max(0, margin + sigmoid(neg_k) - sigmoid(pos)) over groups; pos [A], neg [A, k] are logits."""
    return torch.relu(margin + torch.sigmoid(neg) - torch.sigmoid(pos).unsqueeze(1)).mean()


def iais_schedule(kind: str, step: int, total: int) -> float:
    """s(t) of DESIGN.md, t = optimizer step, T = total steps."""
    import math
    x = min(max(step / max(total, 1), 0.0), 1.0)
    if kind == "exp":
        return math.exp(5.0 * (x - 1.0))
    if kind == "linear":
        return x
    if kind == "log":
        return 1.0 - math.exp(-5.0 * x)
    return 1.0


def candidate_valid(anchor_ids: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """[A, C]: candidate c may serve as a negative of anchor a (a different image id)."""
    return anchor_ids.unsqueeze(1) != cand_ids.unsqueeze(0)

