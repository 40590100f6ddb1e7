"""Winoground-style text / image / group scores on relation-swap quadruples."""
from __future__ import annotations


import torch

from pipeline.errors import UserError
from pipeline.config import EvalConfig
from pipeline.evaluation.retrieval import score_pairs
from pipeline.data.eval_split import EvalData
from pipeline.evaluation.metrics import winoground_scores


# ----------------------------------------------------------------------------- Winoground

def resolve_quadruples(data: EvalData, entries: list[dict], tokenizer=None, max_len: int = 40
                       ) -> tuple[EvalData, list[tuple[int, int, int, int]]]:
    """Map {"image0","caption0","image1","caption1"} entries (image keys, caption strings) to indices.

    A caption found among its image's captions reuses that caption; other caption strings are
    tokenized and appended to a copy of ``data`` (the original is left untouched).
    """
    index, by_image = data.image_rows(), data.caption_rows()
    quads, extra_text, extra_image = [], [], []
    for n, entry in enumerate(entries):
        fields = ("image0", "caption0", "image1", "caption1")
        if not isinstance(entry, dict) or any(k not in entry for k in fields):
            raise UserError(f"quadruple #{n}: expected an object with image0, caption0, image1, caption1")
        row = []
        for side in ("0", "1"):
            key = str(entry["image" + side])
            if key not in index:
                raise UserError(f"quadruple #{n}: image{side}={key!r} is not an image key of the split")
            row.append(index[key])
        caps = []
        for side, img in (("0", row[0]), ("1", row[1])):
            text = str(entry["caption" + side])
            c = by_image.get((img, text))
            if c is None:
                extra_text.append(text)
                extra_image.append(img)
                c = data.n_texts + len(extra_text) - 1
            caps.append(c)
        quads.append((row[0], caps[0], row[1], caps[1]))
    if extra_text:
        data = data.with_captions(extra_text, extra_image, tokenizer, max_len)
    return data, quads


def winoground_metrics(model, data: EvalData, quads: list[tuple[int, int, int, int]],
                       cfg: EvalConfig) -> dict[str, float]:
    """wino_text / wino_image / wino_group (percent) from s[q, i, j] = score(caption_i, image_j)."""
    if not quads:
        return {}
    q = torch.tensor(quads, dtype=torch.long)  # image0, caption0, image1, caption1
    caps, imgs = q[:, [1, 3]], q[:, [0, 2]]
    pairs = torch.stack([caps[:, :, None].expand(-1, 2, 2), imgs[:, None, :].expand(-1, 2, 2)], dim=-1)
    scores = score_pairs(model, data, pairs.reshape(-1, 2), cfg, desc="Winoground").view(-1, 2, 2)
    w = winoground_scores(scores)
    return {"wino_text": w["text"], "wino_image": w["image"], "wino_group": w["group"],
            "wino_quadruples": float(len(quads))}
