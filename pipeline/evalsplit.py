"""A whole split in memory, for N x M retrieval: every image once, every caption of it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import webdataset as wds

from pipeline.decode import (BadSample, captions_of, collate_image, collate_text, decode_image_part,
                             encode_caption, parse_meta, select_member, stable_id)
from pipeline.errors import UserError
from pipeline.shardlist import resolve_shards


@dataclass
class EvalSplit:
    keys: list[str]                       # image keys, row order of the image tensors
    image_ids: torch.Tensor               # long [N], stable hash of the key
    images: dict[str, torch.Tensor]       # pixels / boxes / region_feat / region_mask / region_pos, [N, ...]
    objects: list[list[dict]]             # annotated objects per image (json `objects`)
    captions: list[str]
    text: dict[str, torch.Tensor]         # input_ids, text_mask, word_index, word_to_region, text_id
    caption_image: torch.Tensor           # long [C]: row of the caption's image
    image_captions: list[list[int]]       # caption rows of each image
    quadruples: list[dict] = field(default_factory=list)   # quadruples.json entries, plus resolved rows:
    # image0/image1 (row), caption0/caption1 (caption row or -1) under keys *_row
    skipped: dict[str, int] = field(default_factory=dict)
    image_sizes: list[tuple[float, float]] = field(default_factory=list)   # stored (width, height) per image

    @property
    def index_of(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def image_batch(self, rows: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = {k: v[rows] for k, v in self.images.items()}
        out["image_id"] = self.image_ids[rows]
        return out

    def text_batch(self, rows: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = {k: v[rows] for k, v in self.text.items()}
        width = int(out["text_mask"].sum(1).max()) if len(rows) else 1
        return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in out.items()}

    def pair_batch(self, text_rows, image_rows) -> dict[str, torch.Tensor]:
        batch = self.text_batch(text_rows)
        batch.update(self.image_batch(image_rows))
        return batch


def _resolve_quadruples(path: Path, split: EvalSplit) -> list[dict]:
    try:
        quads = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(quads, list)
    except (OSError, ValueError, AssertionError) as exc:
        raise UserError(f"{path}: unreadable quadruples ({exc!r}); regenerate the synthetic test split") \
            from exc
    index = split.index_of
    out = []
    for q in quads:
        q = dict(q)
        for side in ("0", "1"):
            row = index.get(q.get("image" + side), -1)
            q["image" + side + "_row"] = row
            caps = split.image_captions[row] if row >= 0 else []
            q["caption" + side + "_row"] = next(
                (c for c in caps if split.captions[c] == q.get("caption" + side)), -1)
        out.append(q)
    return out


def load_eval_split(path: str, tokenizer, cfg) -> EvalSplit:
    """Read every sample of the split at `path` (directory, manifest or pattern) in shard order.

    `cfg` is a LoaderConfig (image size, normalisation, text length, image mode).
    """
    spec = cfg.decode_spec()
    from pipeline.loader import SkipCounter   # local: loader re-exports this module

    counter = SkipCounter()
    shards = resolve_shards(path)
    pipe = wds.DataPipeline(wds.SimpleShardList([s.url for s in shards]),
                            wds.tarfile_to_samples(handler=counter.handler, select_files=select_member))
    keys, image_parts, objects, captions, text_parts, caption_image = [], [], [], [], [], []
    sizes: list[tuple[float, float]] = []
    for sample in pipe:
        key = sample["__key__"]
        try:
            meta = parse_meta(sample)
            caps = captions_of(sample, meta)
            image = decode_image_part(sample, meta, spec)
            texts = [encode_caption(tokenizer, meta, caps, i, spec, key) for i in range(len(caps))]
        except BadSample as bad:
            counter.add(bad.reason)
            continue
        row = len(keys)
        keys.append(key)
        image_parts.append(image)
        objects.append(meta.get("objects") or [])
        sizes.append((float(meta.get("width") or 0), float(meta.get("height") or 0)))
        captions.extend(caps)
        text_parts.extend(texts)
        caption_image.extend([row] * len(caps))
    if not keys:
        raise UserError(f"eval split {path}: no readable samples (skipped: {counter.counts})")
    image_captions: list[list[int]] = [[] for _ in keys]
    for c, row in enumerate(caption_image):
        image_captions[row].append(c)
    split = EvalSplit(keys, torch.tensor([stable_id(k) for k in keys], dtype=torch.long),
                      collate_image(image_parts, spec), objects, captions, collate_text(text_parts),
                      torch.tensor(caption_image, dtype=torch.long), image_captions, skipped=counter.counts,
                      image_sizes=sizes)
    base = Path(path) if Path(path).is_dir() else Path(shards[0].url).parent
    if (base / "quadruples.json").is_file():
        split.quadruples = _resolve_quadruples(base / "quadruples.json", split)
    return split
