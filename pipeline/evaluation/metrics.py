"""Retrieval recall@K and Winoground-style scores from score matrices.

Naming follows UNITER: ``txt_rK`` is *text retrieval* (an image is the query, its captions are
the targets), ``img_rK`` is *image retrieval* (a caption is the query, its image is the target).
All values are percentages (0-100).

Ties are counted pessimistically: a wrong item whose score equals the correct item's score
ranks above it, so a constant score matrix gives recall of (almost) zero, never a free win.
NaN scores are treated as -inf (the worst possible score).
"""
from __future__ import annotations

from typing import Sequence

import torch


def _clean(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.detach().to(torch.float64)
    return torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def text_query_ranks(scores: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of each text's correct image: the number of OTHER images scoring >= it."""
    scores = _clean(scores)
    rows = torch.arange(scores.shape[0])
    correct = scores[rows, text_to_image].unsqueeze(1)
    beats = scores >= correct
    beats[rows, text_to_image] = False
    return beats.sum(dim=1)


def image_query_ranks(scores: torch.Tensor, text_to_image: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of each image's best-placed caption among all texts.

    The first correct caption appears after every wrong text whose score is >= the best correct
    caption's score. Images without any caption get rank ``n_texts`` (never a hit).
    """
    scores = _clean(scores)
    n_texts, n_images = scores.shape
    is_caption = torch.zeros(n_texts, n_images, dtype=torch.bool)
    is_caption[torch.arange(n_texts), text_to_image] = True
    neg_inf = torch.full_like(scores, float("-inf"))
    best_correct = torch.where(is_caption, scores, neg_inf).max(dim=0).values  # [n_images]
    beats = (scores >= best_correct.unsqueeze(0)) & ~is_caption
    ranks = beats.sum(dim=0)
    has_caption = is_caption.any(dim=0)
    return torch.where(has_caption, ranks, torch.full_like(ranks, n_texts))


def retrieval_recalls(scores: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in both directions from a ``[n_texts, n_images]`` score matrix (higher = better match).

    ``text_to_image[t]`` is the index of caption t's image. Returns ``txt_rK`` (image -> text, over
    images that have at least one caption), ``img_rK`` (text -> image, over all texts), ``rsum``
    (sum of the six/all values) and ``r_mean`` (rsum divided by their number).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_texts, n_images], got shape {tuple(scores.shape)}")
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long).cpu()
    if text_to_image.shape != (scores.shape[0],):
        raise ValueError(f"text_to_image must have shape ({scores.shape[0]},), "
                         f"got {tuple(text_to_image.shape)}")
    scores = scores.cpu()
    t_ranks = text_query_ranks(scores, text_to_image)
    i_ranks = image_query_ranks(scores, text_to_image)
    i_ranks = i_ranks[torch.bincount(text_to_image, minlength=scores.shape[1]) > 0]
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (i_ranks < k).double().mean().item()
    for k in ks:
        out[f"img_r{k}"] = 100.0 * (t_ranks < k).double().mean().item()
    values = [out[f"txt_r{k}"] for k in ks] + [out[f"img_r{k}"] for k in ks]
    out["rsum"] = float(sum(values))
    out["r_mean"] = out["rsum"] / len(values)
    return out


def winoground_scores(s: torch.Tensor) -> dict[str, float]:
    """Winoground text / image / group scores (percent) from ``s[q, i, j] = score(caption_i, image_j)``.

    text: for each image the matching caption wins (s00 > s10 and s11 > s01);
    image: for each caption the matching image wins (s00 > s01 and s11 > s10);
    group: both. Strict comparisons: ties fail.
    """
    s = _clean(torch.as_tensor(s))
    if s.dim() != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"winoground scores must be [Q, 2, 2], got shape {tuple(s.shape)}")
    if s.shape[0] == 0:
        return {"text": float("nan"), "image": float("nan"), "group": float("nan")}
    s00, s01, s10, s11 = s[:, 0, 0], s[:, 0, 1], s[:, 1, 0], s[:, 1, 1]
    text = (s00 > s10) & (s11 > s01)
    image = (s00 > s01) & (s11 > s10)
    group = text & image
    return {name: 100.0 * v.double().mean().item()
            for name, v in (("text", text), ("image", image), ("group", group))}
