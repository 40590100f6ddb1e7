"""An evaluation split held in memory (every image once, every caption of it, for N x M retrieval), cut
into packed model batches (the view evaluation works on), and its reader."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import webdataset as wds

from pipeline.data.decode import (BadSample, SkipCounter, captions_of, collate_image, decode_image_part,
                                  encode_caption, parse_meta, tar_samples)
from pipeline.config import is_remote
from pipeline.data.shards import MANIFEST_NAME, read_beside, resolve_shards
from pipeline.errors import UserError


QUADRUPLES_NAME = "quadruples.json"
IMAGE_FIELDS = ("pixels", "boxes", "region_mask", "region_pos", "region_feat")


@dataclass
class EvalData:
    """All images and captions of a split.

    images: per-image tensors stacked on dim 0 (any of ``pixels`` [n,3,H,W], ``boxes`` [n,M,4],
    ``region_mask`` [n,M], ``region_pos`` [n,M,7], ``region_feat`` [n,M,D]).
    caption_ids: token ids of each caption (``[CLS] ... [SEP]``, unpadded).
    text_to_image: image index of each caption. captions: the caption strings (pictures).
    token_objects: per caption, per token, the annotated object index (-1 none), or None.
    object_centres: per image, the normalised (x, y) centre of each annotated object [k, 2], or None.
    object_boxes: per image, the normalised (x1, y1, x2, y2) box of each annotated object [k, 4], or None;
    rows of -1 where a box is missing (matched to precomputed region boxes by IoU for ISDa).
    quadruples: relation-swap quadruples as (image0, caption0, image1, caption1) indices.
    token_words: per caption, per token, the index of its whitespace word (-1 specials), or None.
    skipped: unreadable samples left out when the split was read, by reason.
    """

    image_keys: list[str]
    images: dict[str, torch.Tensor]
    caption_ids: list[list[int]]
    text_to_image: torch.Tensor
    captions: list[str] = field(default_factory=list)
    token_objects: list[list[int]] | None = None
    object_centres: list[torch.Tensor] | None = None
    object_boxes: list[torch.Tensor] | None = None
    quadruples: list[tuple[int, int, int, int]] = field(default_factory=list)
    token_words: list[list[int]] | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.text_to_image = torch.as_tensor(self.text_to_image, dtype=torch.long)
        self._lengths = torch.tensor([len(ids) for ids in self.caption_ids], dtype=torch.long)
        width = int(self._lengths.max()) if self.n_texts else 1
        self._ids = torch.zeros(self.n_texts, width, dtype=torch.long)
        for row, ids in enumerate(self.caption_ids):
            self._ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if "region_mask" in self.images:
            self._region_counts = self.images["region_mask"].bool().sum(dim=1).long()
        else:
            self._region_counts = torch.zeros(self.n_images, dtype=torch.long)

    @property
    def n_images(self) -> int:
        return len(self.image_keys)

    @property
    def n_texts(self) -> int:
        return len(self.caption_ids)

    @property
    def has_annotations(self) -> bool:
        return self.token_objects is not None and any(o >= 0 for row in self.token_objects for o in row)

    def text_lengths(self) -> torch.Tensor:
        return self._lengths

    def max_text_len(self) -> int:
        return int(self._lengths.max()) if self.n_texts else 0

    def region_counts(self) -> torch.Tensor:
        return self._region_counts

    def text_inputs(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """input_ids / text_mask of captions ``idx``, padded only to the longest of them."""
        lengths = self._lengths[idx]
        width = int(lengths.max())
        mask = torch.arange(width)[None, :] < lengths[:, None]
        return {"input_ids": self._ids[idx, :width].to(device, non_blocking=True),
                "text_mask": mask.to(device, non_blocking=True)}

    def image_rows(self) -> dict[str, int]:
        """Image key -> image row."""
        return {key: i for i, key in enumerate(self.image_keys)}

    def caption_rows(self) -> dict[tuple[int, str], int]:
        """(image row, caption text) -> the first caption row of that image with that text."""
        rows: dict[tuple[int, str], int] = {}
        for c, (image, text) in enumerate(zip(self.text_to_image.tolist(), self.captions)):
            rows.setdefault((image, text), c)
        return rows

    def token_object_rows(self, idx: torch.Tensor, width: int) -> torch.Tensor:
        """[len(idx), width] annotated object index of each token (-1 none) for captions ``idx``."""
        out = torch.full((len(idx), width), -1, dtype=torch.long)
        if self.token_objects is None:
            return out
        for row, i in enumerate(idx.tolist()):
            objs = self.token_objects[i][:width]
            out[row, : len(objs)] = torch.tensor(objs, dtype=torch.long)
        return out

    def image_inputs(self, idx: torch.Tensor, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The image part of a batch for images ``idx``; region padding trimmed to the longest;
        floating-point tensors cast to ``dtype`` when given (a bf16/fp16 model's weights)."""
        idx = idx.cpu()
        batch = {k: v[idx] for k, v in self.images.items() if k in IMAGE_FIELDS}
        if "region_mask" in batch:
            m = max(1, int(batch["region_mask"].bool().sum(dim=1).max()))
            for k in ("boxes", "region_mask", "region_pos", "region_feat"):
                if k in batch:
                    batch[k] = batch[k][:, :m]
        return {k: v.to(device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
                for k, v in batch.items()}

    def subset(self, max_images: int = 0, captions_per_image: int = 0) -> "EvalData":
        """The first ``max_images`` images with their first ``captions_per_image`` captions each (0: all).
        Quadruples are dropped unless the subset is the whole split."""
        n = min(max_images or self.n_images, self.n_images)
        caps, seen = [], [0] * n
        for c, image in enumerate(self.text_to_image.tolist()):
            if image < n and (not captions_per_image or seen[image] < captions_per_image):
                caps.append(c)
                seen[image] += 1
        if n == self.n_images and len(caps) == self.n_texts:
            return self

        def rows(values):
            return None if values is None else [values[c] for c in caps]

        return replace(self, image_keys=self.image_keys[:n], images={k: v[:n] for k, v in self.images.items()},
                       caption_ids=rows(self.caption_ids), text_to_image=self.text_to_image[caps],
                       captions=rows(self.captions) if self.captions else [],
                       token_objects=rows(self.token_objects), token_words=rows(self.token_words),
                       object_centres=None if self.object_centres is None else self.object_centres[:n],
                       object_boxes=None if self.object_boxes is None else self.object_boxes[:n],
                       quadruples=[])

    def with_captions(self, texts: list[str], image_of: list[int], tokenizer, max_len: int) -> "EvalData":
        """A copy with captions appended (e.g. user quadruples' text not present in the split)."""
        if tokenizer is None:
            raise UserError("quadruple captions that are not captions of the split need a tokenizer: "
                            "pass --tokenizer (or use the model directory's tokenizer)")
        new_ids = [list(tokenizer.encode(text, max_len).ids) for text in texts]
        token_objects = None
        if self.token_objects is not None:
            token_objects = self.token_objects + [[-1] * len(ids) for ids in new_ids]
        token_words = None
        if self.token_words is not None:
            token_words = self.token_words + [list(tokenizer.encode(t, max_len).word_index) for t in texts]
        return replace(self, caption_ids=self.caption_ids + new_ids, captions=self.captions + list(texts),
                       text_to_image=torch.cat([self.text_to_image,
                                                torch.tensor(image_of, dtype=torch.long)]),
                       token_objects=token_objects, token_words=token_words)


def object_centres(objects: list[dict], size: tuple[float, float]) -> torch.Tensor:
    """Normalised (x, y) centres [k, 2] of annotated objects (``box`` in pixels of an image of ``size``
    (width, height)); -1 where a box or the size is missing. Places objects on the patch grid for ISDa."""
    width, height = size
    out = torch.full((len(objects), 2), -1.0)
    for k, obj in enumerate(objects):
        try:
            x1, y1, x2, y2 = (float(v) for v in obj["box"])
        except (KeyError, TypeError, ValueError):
            continue
        if width > 0 and height > 0:
            out[k] = torch.tensor([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height])
    return out


def object_boxes(objects: list[dict], size: tuple[float, float]) -> torch.Tensor:
    """Normalised (x1, y1, x2, y2) boxes [k, 4] of annotated objects (``box`` in pixels of an image of
    ``size`` (width, height)), clamped to [0, 1] as region positions are; -1 where a box or the size is
    missing."""
    width, height = size
    out = torch.full((len(objects), 4), -1.0)
    if width <= 0 or height <= 0:
        return out
    scale = torch.tensor([width, height, width, height])
    for k, obj in enumerate(objects):
        try:
            box = torch.tensor([float(v) for v in obj["box"]])
        except (KeyError, TypeError, ValueError):
            continue
        if box.shape == (4,):
            out[k] = (box / scale).clamp(0.0, 1.0)
    return out


# ----------------------------------------------------------------------------- reading a split into memory

def _quadruple_rows(raw: bytes, where: str, data: EvalData) -> list[tuple[int, int, int, int]]:
    """quadruples.json entries (image0/caption0/image1/caption1 as key and caption text) as row indices;
    entries naming an image or caption the split does not hold are dropped. ``where``: its location."""
    try:
        quads = json.loads(raw.decode("utf-8"))
        assert isinstance(quads, list)
    except (ValueError, AssertionError) as exc:
        raise UserError(f"{where}: unreadable quadruples ({exc!r}); regenerate the synthetic test split") \
            from exc
    index, caption_rows = data.image_rows(), data.caption_rows()
    out = []
    for q in quads:
        row = []
        for side in ("0", "1"):
            image = index.get(q.get("image" + side), -1)
            row += [image, caption_rows.get((image, q.get("caption" + side)), -1)]
        if min(row) >= 0:
            out.append((row[0], row[1], row[2], row[3]))
    return out


def load_eval_split(path: str, tokenizer, cfg) -> EvalData:
    """Read every sample of the split at `path` (any shard spec, local or remote) in shard order.

    `cfg` is a LoaderConfig (image size, normalisation, text length, image mode). Unreadable samples are
    skipped and counted in ``EvalData.skipped``; a ``quadruples.json`` beside the shards is resolved.
    """
    spec = cfg.decode_spec()
    counter = SkipCounter()
    shards = resolve_shards(path)
    pipe = wds.DataPipeline(wds.SimpleShardList([s.url for s in shards]), *tar_samples(counter))
    keys, image_parts, centres, boxes, captions, texts, text_to_image = [], [], [], [], [], [], []
    for sample in pipe:
        key = sample["__key__"]
        try:
            meta = parse_meta(sample)
            caps = captions_of(sample, meta)
            image = decode_image_part(sample, meta, spec)
            encoded = [encode_caption(tokenizer, meta, caps, i, spec, key) for i in range(len(caps))]
        except BadSample as bad:
            counter.add(bad.reason)
            continue
        text_to_image.extend([len(keys)] * len(caps))
        keys.append(key)
        image_parts.append(image)
        size = (float(meta.get("width") or 0), float(meta.get("height") or 0))
        centres.append(object_centres(meta.get("objects") or [], size))
        boxes.append(object_boxes(meta.get("objects") or [], size))
        captions.extend(caps)
        texts.extend(encoded)
    if not keys:
        raise UserError(f"eval split {path}: no readable samples (skipped: {counter.counts})")
    data = EvalData(image_keys=keys, images=collate_image(image_parts, spec),
                    caption_ids=[list(t["input_ids"]) for t in texts], text_to_image=text_to_image, captions=captions,
                    token_objects=[list(t["word_to_region"]) for t in texts], object_centres=centres,
                    object_boxes=boxes, token_words=[list(t["word_index"]) for t in texts],
                    skipped=dict(counter.counts))
    # beside the shards; a local split directory's own file wins (its shards may be links to elsewhere)
    local_dir = not is_remote(path) and Path(path).is_dir()
    anchor = str(Path(path) / MANIFEST_NAME) if local_dir else shards[0].url
    quadruples = read_beside(anchor, QUADRUPLES_NAME)
    if quadruples is not None:
        data.quadruples = _quadruple_rows(quadruples, f"{QUADRUPLES_NAME} beside {anchor}", data)
    return data
