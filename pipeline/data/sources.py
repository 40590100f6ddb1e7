"""Turns real image-caption data into ``Sample``s for the shard writer.

Sources: the Karpathy split JSON (``dataset_flickr30k.json`` / ``dataset_coco.json``) with an image root,
and a CSV/TSV/JSONL table of image path + caption(s). Images are stored as their original JPEG/PNG bytes
unless they must be converted or shrunk; optional precomputed region features (one ``.npz`` per image)
are validated and stored as the sample's ``npz`` member.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import UserError
from pipeline.data.decode import to_rgb
from pipeline.data.shards import Sample

KARPATHY_SPLITS = ("train", "restval", "val", "test")
TABLE_FORMATS = ("csv", "tsv", "jsonl")
_EXIF_ORIENTATION = 0x0112
_PASS_THROUGH = {"JPEG": "jpg", "PNG": "png"}


@dataclass(frozen=True)
class ImageOptions:
    """How images (and their region features) are stored: ``max_side`` shrinks larger images."""

    max_side: int | None = None
    jpeg_quality: int = 95
    features_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 8:
            raise UserError(f"max_side must be >= 8 pixels, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise UserError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.features_dir is not None and not Path(self.features_dir).is_dir():
            raise UserError(f"features directory not found: {self.features_dir}")


def sample_key(relative_path: str) -> str:
    """A tar-safe key from an image path: extension dropped, other characters mapped to '_'."""
    stem = str(Path(relative_path).with_suffix(""))
    return re.sub(r"[^A-Za-z0-9_\-]", "_", stem).strip("_") or "image"


def load_image(path: Path, opts: ImageOptions) -> tuple[bytes, str, int, int, float]:
    """Returns (encoded bytes, 'jpg'|'png', width, height, scale applied to the original)."""
    if not path.is_file():
        raise UserError(f"image not found: {path} (check the image root / paths in the input)")
    raw = path.read_bytes()
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            fmt, rotated = img.format, img.getexif().get(_EXIF_ORIENTATION, 1) != 1
            upright = ImageOps.exif_transpose(img) if rotated else img   # re-encoding drops the EXIF tag
            w, h = upright.size
            scale = min(1.0, opts.max_side / max(w, h)) if opts.max_side else 1.0
            if fmt in _PASS_THROUGH and scale == 1.0 and not rotated:
                return raw, _PASS_THROUGH[fmt], w, h, 1.0
            rgb = to_rgb(upright)   # a 16-bit TIFF is scaled to 8 bits, as the loader does, not clipped to white
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        why = "not an image file PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
        raise UserError(f"cannot decode image {path}: {why}") from None
    if scale < 1.0:
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=opts.jpeg_quality)
    return out.getvalue(), "jpg", rgb.width, rgb.height, scale


def load_region_features(path: Path, stored_size: tuple[int, int]) -> bytes:
    """Validates a region-feature ``.npz`` and re-encodes it with boxes in stored-image pixels.

    Needs ``features`` [n, d], ``boxes`` [n, 4] (x1, y1, x2, y2 in pixels of ``image_size``) and
    ``image_size`` [2] = (width, height) of the image the boxes refer to.
    """
    if not path.is_file():
        raise UserError(f"region features not found: {path} (one <image name>.npz per image)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("features", "boxes", "image_size") if k in data}
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read region features {path}: {e}") from None
    missing = sorted({"features", "boxes", "image_size"} - set(arrays))
    if missing:
        raise UserError(f"{path}: missing array(s) {', '.join(missing)} (need features, boxes, image_size)")
    feats, boxes, size = arrays["features"], arrays["boxes"], arrays["image_size"].reshape(-1)
    if feats.ndim != 2 or feats.shape[0] < 1 or not np.issubdtype(feats.dtype, np.number):
        raise UserError(f"{path}: 'features' must be a numeric [n, d] array with n >= 1, got {feats.shape}")
    if boxes.shape != (feats.shape[0], 4):
        raise UserError(f"{path}: 'boxes' must be [{feats.shape[0]}, 4] to match 'features', "
                        f"got {boxes.shape}")
    if size.shape != (2,) or not np.all(size > 0):
        raise UserError(f"{path}: 'image_size' must be 2 positive numbers (width, height), got {size}")
    if not (np.isfinite(feats).all() and np.isfinite(boxes).all()):
        raise UserError(f"{path}: features/boxes contain NaN or inf")
    sx, sy = stored_size[0] / float(size[0]), stored_size[1] / float(size[1])
    scaled = boxes.astype(np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)
    out = io.BytesIO()
    np.savez(out, features=feats.astype(np.float32), boxes=scaled,
             image_size=np.array(stored_size, dtype=np.int64))
    return out.getvalue()


def make_sample(key: str, image_path: Path, captions: list[str], opts: ImageOptions,
                extra: dict | None = None) -> Sample:
    image, ext, w, h, _ = load_image(image_path, opts)
    npz = None
    if opts.features_dir is not None:
        npz = load_region_features(Path(opts.features_dir) / f"{image_path.stem}.npz", (w, h))
    meta = {"captions": captions, "width": w, "height": h, **(extra or {})}
    return Sample(key=key, image=image, image_ext=ext, meta=meta, npz=npz)


# --- Karpathy split JSON -------------------------------------------------------------------------

def read_karpathy(json_path: Path) -> list[dict]:
    """The ``images`` list of a Karpathy split file, each entry checked for the fields we use."""
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"Karpathy split file not found: {json_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read JSON {json_path}: {e}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{json_path}: expected an object with an 'images' list (Karpathy split format)")
    for i, entry in enumerate(images):
        where = f"{json_path}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise UserError(f"{where}: needs a string 'filename'")
        if entry.get("split") not in KARPATHY_SPLITS:
            raise UserError(f"{where}: unknown split {entry.get('split')!r} "
                            f"(valid: {', '.join(KARPATHY_SPLITS)})")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences or not all(
                isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise UserError(f"{where} ({entry['filename']}): 'sentences' must be a non-empty list of {{raw}}")
    return images


def check_karpathy_splits(splits: Sequence[str]) -> None:
    unknown = [s for s in splits if s not in KARPATHY_SPLITS]
    if unknown or not splits:
        raise UserError(f"unknown Karpathy split {', '.join(unknown) or '(none)'!s} "
                        f"(valid: {', '.join(KARPATHY_SPLITS)})")


def karpathy_entries(images: list[dict], splits: Sequence[str]) -> list[dict]:
    check_karpathy_splits(splits)
    return [e for e in images if e["split"] in splits]


def karpathy_samples(entries: list[dict], image_root: Path, opts: ImageOptions) -> Iterator[Sample]:
    """Samples for the given Karpathy entries; images at ``image_root/[filepath/]filename``."""
    for entry in entries:
        rel = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
        path = Path(image_root) / rel
        if not path.is_file() and entry.get("filepath"):
            path = Path(image_root) / entry["filename"]  # flat image folders are common too
        captions = [s["raw"].strip() for s in entry["sentences"] if s["raw"].strip()]
        if not captions:
            raise UserError(f"{rel}: all sentences are empty")
        yield make_sample(sample_key(rel), path, captions, opts, {"image_id": entry["filename"]})


# --- CSV / TSV / JSONL tables ---------------------------------------------------------------------

def table_format(path: Path, fmt: str | None) -> str:
    fmt = fmt or {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix.lower())
    if fmt not in TABLE_FORMATS:
        raise UserError(f"cannot tell the format of {path}: give --format ({', '.join(TABLE_FORMATS)})")
    return fmt


def read_table(path: Path, image_column: str = "image", caption_column: str = "caption",
               fmt: str | None = None) -> list[tuple[str, list[str]]]:
    """(image path, captions) per image, in first-appearance order; repeated rows are grouped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"table not found: {path}")
    fmt = table_format(path, fmt)
    rows = _jsonl_rows(path) if fmt == "jsonl" else _csv_rows(path, fmt)
    grouped: dict[str, list[str]] = {}
    for line, row in rows:
        for col in (image_column, caption_column):
            if col not in row:
                raise UserError(f"{path}:{line}: no column {col!r} (has: {', '.join(map(str, row))}); "
                                f"choose with --image-column / --caption-column")
        image, caps = row[image_column], row[caption_column]
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(image, str) or not image.strip():
            raise UserError(f"{path}:{line}: column {image_column!r} must be a non-empty path")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise UserError(f"{path}:{line}: column {caption_column!r} must be a non-empty string "
                            f"or a list of them")
        grouped.setdefault(image.strip(), []).extend(c.strip() for c in caps)
    if not grouped:
        raise UserError(f"{path}: no rows")
    return list(grouped.items())


def _csv_rows(path: Path, fmt: str) -> Iterator[tuple[int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:   # -sig: spreadsheets write a byte-order mark
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            for row in reader:
                _check_field_count(row, reader.fieldnames, path, reader.line_num, fmt)
                yield reader.line_num, row
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {fmt.upper()} {path}: {e}") from None


def _check_field_count(row: dict, header: list[str], path: Path, line: int, fmt: str) -> None:
    """A row with more fields than the header is refused: in a CSV it is mostly a caption with an unquoted comma,
    which would otherwise be cut at that comma."""
    extra = row.get(None)   # csv.DictReader's key for the fields beyond the header
    if extra:
        separator = "tab" if fmt == "tsv" else "comma"
        raise UserError(f"{path}:{line}: {len(header) + len(extra)} fields but the header has {len(header)} "
                        f"({', '.join(header)}): quote a value that contains a {separator}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read JSONL {path}: not UTF-8 ({e})") from None
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"cannot read JSON {path} line {i}: {e}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: each line must be a JSON object")
        yield i, row


def table_samples(rows: list[tuple[str, list[str]]], image_root: Path,
                  opts: ImageOptions) -> Iterator[Sample]:
    """Samples for grouped table rows; relative image paths are resolved against ``image_root``."""
    for rel, captions in rows:
        path = Path(rel) if Path(rel).is_absolute() else Path(image_root) / rel
        yield make_sample(sample_key(rel), path, captions, opts, {"image_id": rel})
