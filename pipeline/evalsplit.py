"""Read a whole split into memory for N x M retrieval: every image once, every caption of it."""
from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from pipeline.decode import (BadSample, captions_of, collate_image, decode_image_part, encode_caption, parse_meta,
                             select_member)
from pipeline.errors import UserError
from pipeline.eval_data import EvalData, object_boxes, object_centres
from pipeline.shardlist import resolve_shards


def _quadruple_rows(path: Path, data: EvalData) -> list[tuple[int, int, int, int]]:
    """quadruples.json entries (image0/caption0/image1/caption1 as key and caption text) as row indices;
    entries naming an image or caption the split does not hold are dropped."""
    try:
        quads = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(quads, list)
    except (OSError, ValueError, AssertionError) as exc:
        raise UserError(f"{path}: unreadable quadruples ({exc!r}); regenerate the synthetic test split") \
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
    """Read every sample of the split at `path` (directory, manifest or pattern) in shard order.

    `cfg` is a LoaderConfig (image size, normalisation, text length, image mode). Unreadable samples are
    skipped and counted in ``EvalData.skipped``; a ``quadruples.json`` beside the shards is resolved.
    """
    spec = cfg.decode_spec()
    from pipeline.loader import SkipCounter   # local: loader re-exports this module

    counter = SkipCounter()
    shards = resolve_shards(path)
    pipe = wds.DataPipeline(wds.SimpleShardList([s.url for s in shards]),
                            wds.tarfile_to_samples(handler=counter.handler, select_files=select_member))
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
    base = Path(path) if Path(path).is_dir() else Path(shards[0].url).parent
    if (base / "quadruples.json").is_file():
        data.quadruples = _quadruple_rows(base / "quadruples.json", data)
    return data
