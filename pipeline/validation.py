"""Validation / test during training: retrieval recall + ISD on an in-memory split.

Uses ``pipeline.evaluation.evaluate`` when it can build its ``EvalData`` from the split; otherwise a minimal
full-retrieval recall + ISD computed here (the same numbers, fewer extras). Collective: all ranks call it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pipeline import distributed as dist_utils
from pipeline.metrics import retrieval_recalls

ISD_ALIGNMENTS = ("singular", "distributed", "congruence")


def _to(d: dict, device) -> dict:
    return {k: v.to(device) for k, v in d.items() if torch.is_tensor(v)}


def _rank_slice(n: int) -> tuple[torch.Tensor, int]:
    """This rank's rows of ``range(n)``, padded (with row 0) to the same length on every rank."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    per = math.ceil(n / world)
    rows = torch.arange(rank * per, min(n, (rank + 1) * per))
    return torch.cat([rows, torch.zeros(per - rows.numel(), dtype=torch.long)]), per


def _gather(local: torch.Tensor, n: int) -> torch.Tensor:
    if not dist_utils.is_initialized() or dist_utils.world_size() == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(dist_utils.world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)[:n]


@torch.no_grad()
def score_matrix(module, split, device, pair_batch: int) -> torch.Tensor:
    """Full cross-encoder scores [n_texts, n_images]; the image encoder runs once per image."""
    from models.image_encoder import ImageTokens
    n_img, n_txt = len(split.keys), len(split.captions)
    parts = [module.encode_image(_to(split.image_batch(torch.arange(s, min(n_img, s + 128))), device))
             for s in range(0, n_img, 128)]
    tokens = ImageTokens(*(torch.cat([getattr(p, f) for p in parts]) for f in ("feat", "pos", "mask")))
    rows, per = _rank_slice(n_txt)
    pair_t = rows.repeat_interleave(n_img)
    pair_i = torch.arange(n_img).repeat(per)
    out = []
    for s in range(0, pair_t.numel(), pair_batch):
        t, i = pair_t[s:s + pair_batch], pair_i[s:s + pair_batch]
        texts = _to(split.text_batch(t), device)
        idx = i.to(device)
        out.append(module.score(texts, image_tokens=ImageTokens(tokens.feat[idx], tokens.pos[idx],
                                                                   tokens.mask[idx])).float().cpu())
    local = torch.cat(out).view(per, n_img)
    return _gather(local, n_txt)


@torch.no_grad()
def isd_scores(module, split, device, max_pairs: int = 256, layer: int = -1) -> dict[str, float]:
    """Mean ISD per alignment and side on matched pairs (evenly spaced captions, the same on all ranks)."""
    from models.iais import isd
    n_txt = len(split.captions)
    caps = torch.linspace(0, n_txt - 1, min(max_pairs, n_txt)).long()
    batch = _to(split.pair_batch(caps, split.caption_image[caps]), device)
    out = module(batch, attn_logit_layers=[layer])
    logits = out.attn_logits[layer % module.config.num_layers]
    result = {}
    for alignment in ISD_ALIGNMENTS:
        for side in ("L", "V"):
            result[f"isd_{alignment}_{side}"] = isd(logits, out.word_mask, out.region_mask,
                                                    alignment=alignment, side=side).mean().item()
    return result


def subset(split, max_images: int = 0, captions_per_image: int = 0):
    """The first ``max_images`` images with their first ``captions_per_image`` captions (0: all)."""
    import dataclasses
    n = min(max_images or len(split.keys), len(split.keys))
    caps = [c for row in range(n) for c in split.image_captions[row][:captions_per_image or None]]
    caps_t = torch.tensor(caps, dtype=torch.long)
    remap = {c: i for i, c in enumerate(caps)}
    return dataclasses.replace(
        split, keys=split.keys[:n], image_ids=split.image_ids[:n],
        images={k: v[:n] for k, v in split.images.items()}, objects=split.objects[:n],
        captions=[split.captions[c] for c in caps], text={k: v[caps_t] for k, v in split.text.items()},
        caption_image=split.caption_image[caps_t],
        image_captions=[[remap[c] for c in split.image_captions[row] if c in remap] for row in range(n)],
        quadruples=[])


def evaluate_split(module, split, cfg, picture_dir=None) -> dict[str, float]:
    """Collective. ``cfg``: pipeline.evaluation.EvalConfig (the training config's ``eval`` section)."""
    from pipeline.evaluation import evaluate
    return evaluate(module, split, cfg, picture_dir=picture_dir).metrics


def minimal_evaluate_split(module, split, device, pair_batch: int, isd_on: bool = True) -> dict[str, float]:
    """Full retrieval + ISD without the evaluation module (kept for cross-checks)."""
    was_training = module.training
    module.eval()
    try:
        t0 = time.perf_counter()
        scores = score_matrix(module, split, device, pair_batch)
        metrics = retrieval_recalls(scores, split.caption_image)
        metrics["eval_seconds"] = time.perf_counter() - t0
        metrics["pairs_per_s"] = scores.numel() / max(metrics["eval_seconds"], 1e-9)
        if isd_on:
            metrics.update(isd_scores(module, split, device))
    finally:
        module.train(was_training)
    return metrics


def recall_table(metrics: dict[str, float], title: str) -> str:
    head = f"{title}: " + "  ".join(f"{k}={metrics[k]:.1f}" for k in
                                    ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "rsum")
                                    if k in metrics)
    rows = ["| direction | R@1 | R@5 | R@10 |", "| --- | --- | --- | --- |"]
    for name, prefix in (("image -> text (txt_r)", "txt_r"), ("text -> image (img_r)", "img_r")):
        if f"{prefix}1" in metrics:
            rows.append(f"| {name} | " + " | ".join(f"{metrics[f'{prefix}{k}']:.1f}" for k in (1, 5, 10)) + " |")
    extra = [f"rsum {metrics['rsum']:.1f}"] if "rsum" in metrics else []
    extra += [f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.startswith("isd_")]
    extra += [f"{k} {v:.1f}" for k, v in sorted(metrics.items()) if k.startswith("wino")]
    return "\n".join([head, *rows, ", ".join(extra)])
