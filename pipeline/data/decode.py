"""Raw tar sample (bytes per member) -> decoded sample -> padded batch dict (DESIGN.md batch contract).

Images are decoded with PIL only (JPEG draft mode when the target is at most half the stored size);
nothing is ever unpickled (npz is loaded with allow_pickle=False; .pyd/.pickle members are never read).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MEMBER_EXTS = frozenset(IMAGE_EXTS + ("txt", "json", "npz"))
_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)   # EXIF orientations that swap width and height
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS, "box": Image.BOX}


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodeSpec:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_text_len: int
    image_mode: str          # patch | roi | features
    max_regions: int
    interpolation: str = "bicubic"
    feat_dim: int | None = None
    swap_captions: bool = False   # also encode a relation/attribute-swapped caption (pipeline.data.swaps)


def stable_id(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") \
        & 0x7FFF_FFFF_FFFF_FFFF


def select_member(fname: str) -> bool:
    """Only members we decode are read out of the tar (never .pyd/.pickle)."""
    return fname.rpartition(".")[2].lower() in MEMBER_EXTS


def parse_meta(sample: dict[str, Any]) -> dict:
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadSample("bad_json") from exc
    if not isinstance(meta, dict):
        raise BadSample("bad_json")
    return meta


def captions_of(sample: dict[str, Any], meta: dict) -> list[str]:
    caps = meta.get("captions")
    if caps is not None:
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise BadSample("bad_json")
    elif isinstance(meta.get("caption"), str):  # img2dataset json
        caps = [meta["caption"]]
    elif "txt" in sample:
        try:
            caps = [sample["txt"].decode("utf-8")]
        except UnicodeDecodeError as exc:
            raise BadSample("bad_caption_encoding") from exc
    else:
        raise BadSample("missing_caption")
    if not caps or not all(c.strip() for c in caps):
        raise BadSample("empty_caption")
    return caps


def decode_image(data: bytes, spec: DecodeSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """HWC uint8 RGB of size image_size^2 and the stored (width, height), upright.

    Any mode becomes RGB (grayscale, palette, CMYK, RGBA with its alpha dropped; 16-bit keeps its top 8 bits)
    and the EXIF orientation is applied, so the stored size is the upright one. An image of more than
    PIL's ``Image.MAX_IMAGE_PIXELS`` is refused before its pixels are decoded (a decompression bomb)."""
    size = spec.image_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        stored = img.size[::-1] if orientation in _QUARTER_TURNS else img.size
        if img.format == "JPEG" and min(img.size) >= 2 * size:
            img.draft("RGB", (size, size))  # DCT-domain downscale; result stays >= size on both sides
        img = to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
        if img.size != (size, size):
            img = img.resize((size, size), _RESAMPLE.get(spec.interpolation, Image.BICUBIC))
        return np.asarray(img), stored
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("bad_image") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL mode; 16/32-bit integer images are scaled to 8 bits instead of clipped at 255, and float
    ("F") images from [0, 1] (or [0, max] when brighter) instead of cast."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(img).astype(np.int64)
        top = 65535 if img.mode.startswith("I;16") or wide.max(initial=0) <= 65535 else wide.max()
        img = Image.fromarray((np.clip(wide, 0, top) * 255 // max(top, 1)).astype(np.uint8), mode="L")
    elif img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = max(1.0, float(values.max(initial=0.0)))
        img = Image.fromarray(np.round(np.clip(values, 0.0, top) * 255 / top).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise BadSample("missing_image")


def load_npz(data: bytes, spec: DecodeSpec,
             check_dim: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            feats = np.asarray(z["features"], dtype=np.float32)
            boxes = np.asarray(z["boxes"], dtype=np.float32)
            wh = tuple(int(v) for v in np.asarray(z["image_size"]).reshape(-1))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise BadSample("bad_npz") from exc
    if (feats.ndim != 2 or feats.shape[0] == 0 or boxes.shape != (feats.shape[0], 4) or len(wh) != 2
            or min(wh) <= 0 or (check_dim and spec.feat_dim is not None and feats.shape[1] != spec.feat_dim)
            or not np.isfinite(feats).all()):
        raise BadSample("bad_npz")
    return feats[: spec.max_regions], boxes[: spec.max_regions], wh


def _region_pos(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    scale = np.array([width, height, width, height], dtype=np.float32)
    xyxy = np.clip(boxes / scale, 0.0, 1.0)
    w, h = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
    return np.concatenate([xyxy, w[:, None], h[:, None], (w * h)[:, None]], axis=1).astype(np.float32)


def _roi_boxes(sample: dict[str, Any], meta: dict, stored: tuple[int, int], spec: DecodeSpec) -> np.ndarray:
    """Boxes in pixels of the resized image: npz boxes, else annotated objects, else the whole image."""
    width, height = stored
    if "npz" in sample:
        _, boxes, (width, height) = load_npz(sample["npz"], spec, check_dim=False)   # boxes only
    elif meta.get("objects"):
        try:
            boxes = np.array([o["box"] for o in meta["objects"]], dtype=np.float32).reshape(-1, 4)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadSample("bad_json") from exc
        boxes = boxes[: spec.max_regions]
    else:
        boxes = np.array([[0, 0, width, height]], dtype=np.float32)
    size = spec.image_size
    return boxes * np.array([size / width, size / height] * 2, dtype=np.float32)


def _word_to_region(meta: dict, cap_index: int, word_index: list[int]) -> list[int]:
    table = meta.get("word_objects")
    if table is None:
        return [-1] * len(word_index)
    try:
        words = table[cap_index]
        return [int(words[w]) if w >= 0 else -1 for w in word_index]
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise BadSample("bad_json") from exc


def object_centres(meta: dict, width: float, height: float) -> list[tuple[float, float]]:
    """Normalised (x, y) centre of each annotated object's pixel box (grounding targets)."""
    try:
        boxes = [[float(v) for v in o["box"]] for o in meta.get("objects") or []]
        if any(len(b) != 4 or not all(math.isfinite(v) for v in b) for b in boxes):
            raise ValueError("box")   # a NaN centre would make the grounding loss NaN and stop the run
    except (KeyError, TypeError, ValueError) as exc:
        raise BadSample("bad_json") from exc
    return [((b[0] + b[2]) / (2 * width), (b[1] + b[3]) / (2 * height)) for b in boxes]


def decode_image_part(sample: dict[str, Any], meta: dict, spec: DecodeSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.image_mode == "features":
        if "npz" not in sample:
            raise BadSample("missing_features")
        feats, boxes, (width, height) = load_npz(sample["npz"], spec)
        out["region_feat"], out["region_pos"] = feats, _region_pos(boxes, width, height)
        out["object_centres"] = object_centres(meta, width, height)
        return out
    pixels, stored = decode_image(_image_bytes(sample), spec)
    out["pixels"] = pixels
    out["object_centres"] = object_centres(meta, *stored)
    if spec.image_mode == "roi":
        boxes = _roi_boxes(sample, meta, stored, spec)
        out["boxes"] = boxes
        out["region_pos"] = _region_pos(boxes, spec.image_size, spec.image_size)
    return out


def encode_caption(tokenizer, meta: dict, captions: list[str], cap_index: int, spec: DecodeSpec,
                   key: str) -> dict[str, Any]:
    enc = tokenizer.encode(captions[cap_index], spec.max_text_len)
    return {"input_ids": enc.ids, "word_index": enc.word_index,
            "word_to_region": _word_to_region(meta, cap_index, enc.word_index),
            "text_id": stable_id(f"{key}#{cap_index}")}


def encode_swap(tokenizer, meta: dict, caption: str, cap_index: int, spec: DecodeSpec, choice: int) -> dict:
    """The swapped caption picked for this epoch; ``has_swap`` False (and the caption itself) when none."""
    from pipeline.data.swaps import pick_swap
    table = meta.get("word_objects")
    words = table[cap_index] if isinstance(table, list) and cap_index < len(table) else None
    text = pick_swap(caption, words, meta.get("objects") or [], choice)
    return {"swap_ids": tokenizer.encode(text or caption, spec.max_text_len).ids, "has_swap": text is not None}


def caption_choice(seed: int, epoch: int, key: str, n: int) -> int:
    """One caption per image per epoch, independent of where the sample lands in the stream."""
    return stable_id(f"{seed}/{epoch}/{key}") % n


def decode_train_sample(sample: dict[str, Any], tokenizer, spec: DecodeSpec, seed: int, epoch: int) -> dict:
    key = sample["__key__"]
    meta = parse_meta(sample)
    captions = captions_of(sample, meta)
    out = decode_image_part(sample, meta, spec)
    cap_index = caption_choice(seed, epoch, key, len(captions))
    out.update(encode_caption(tokenizer, meta, captions, cap_index, spec, key))
    if spec.swap_captions:
        out.update(encode_swap(tokenizer, meta, captions[cap_index], cap_index, spec,
                               stable_id(f"swap/{seed}/{epoch}/{key}")))
    out["image_id"] = stable_id(key)
    out["key"] = key
    return out


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate_text(samples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in samples)
    ids = _pad([s["input_ids"] for s in samples], width, 0)
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    return {"input_ids": ids, "text_mask": torch.arange(width)[None, :] < lengths[:, None],
            "word_index": _pad([s["word_index"] for s in samples], width, -1),
            "word_to_region": _pad([s["word_to_region"] for s in samples], width, -1),
            "text_id": torch.tensor([s["text_id"] for s in samples], dtype=torch.long)}


def normalise(pixels: np.ndarray, spec: DecodeSpec) -> torch.Tensor:
    """[B,H,W,3] uint8 -> [B,3,H,W] float normalised with the timm mean/std."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _pad_regions(arrays: list[np.ndarray], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = max(1, max(len(a) for a in arrays))
    out = torch.zeros((len(arrays), m, dim), dtype=torch.float32)
    mask = torch.zeros((len(arrays), m), dtype=torch.bool)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = torch.from_numpy(a)
        mask[i, : len(a)] = True
    return out, mask


def collate_image(samples: list[dict], spec: DecodeSpec) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if spec.image_mode == "features":
        out["region_feat"], out["region_mask"] = _pad_regions([s["region_feat"] for s in samples],
                                                              samples[0]["region_feat"].shape[1])
    else:
        out["pixels"] = normalise(np.stack([s["pixels"] for s in samples]), spec)
        if spec.image_mode == "roi":
            out["boxes"], out["region_mask"] = _pad_regions([s["boxes"] for s in samples], 4)
    if spec.image_mode != "patch":
        out["region_pos"], _ = _pad_regions([s["region_pos"] for s in samples], 7)
    return out


def collate_grounding(samples: list[dict], word_to_region: torch.Tensor) -> dict[str, torch.Tensor]:
    """word_centre [B, T, 2]: the annotated object's normalised centre per token; word_grounded [B, T]."""
    centres = torch.zeros(word_to_region.shape + (2,))
    grounded = torch.zeros(word_to_region.shape, dtype=torch.bool)
    for i, s in enumerate(samples):
        table = torch.tensor(s.get("object_centres") or [], dtype=torch.float32).reshape(-1, 2)
        index = word_to_region[i]
        ok = (index >= 0) & (index < len(table))
        grounded[i] = ok
        centres[i, ok] = table[index[ok]]
    return {"word_centre": centres, "word_grounded": grounded}


def collate_swaps(samples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(s["swap_ids"]) for s in samples)
    lengths = torch.tensor([len(s["swap_ids"]) for s in samples])
    return {"swap_input_ids": _pad([s["swap_ids"] for s in samples], width, 0),
            "swap_text_mask": torch.arange(width)[None, :] < lengths[:, None],
            "has_swap": torch.tensor([s["has_swap"] for s in samples], dtype=torch.bool)}


def collate(samples: list[dict], spec: DecodeSpec) -> dict[str, torch.Tensor]:
    batch = collate_text(samples)
    batch.update(collate_image(samples, spec))
    batch["image_id"] = torch.tensor([s["image_id"] for s in samples], dtype=torch.long)
    if "key" in samples[0]:
        batch["keys"] = [s["key"] for s in samples]   # named in errors (e.g. a non-finite loss)
    if "object_centres" in samples[0]:
        batch.update(collate_grounding(samples, batch["word_to_region"]))
    if "swap_ids" in samples[0]:
        batch.update(collate_swaps(samples))
    return batch


class SkipCounter:
    """Counts skipped samples by reason; doubles as the webdataset exception handler."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._truncated: set[str] = set()

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def handler(self, exn: Exception) -> bool:
        if isinstance(exn, (tarfile.ReadError, EOFError)) or "unexpected end" in str(exn):
            where = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), "?")
            if where not in self._truncated:   # the tar iterator and the expander both report it
                self._truncated.add(where)
                self.add("truncated_tar")
        elif isinstance(exn, OSError):
            self.add("unreadable_shard")
        elif isinstance(exn, ValueError) and "duplicate" in str(exn):
            self.add("duplicate_member")
        else:
            self.add("tar_error")
        return True

    def drop_repeated_keys(self, samples: Iterator[dict]) -> Iterator[dict]:
        """A WebDataset stage: a key seen earlier in the same shard (not next to it, so the tar reader made
        it a second sample) is skipped and counted ``duplicate_key``; the first sample of the key is kept."""
        url, seen = None, set()
        for sample in samples:
            if sample.get("__url__") != url:
                url, seen = sample.get("__url__"), set()
            if sample["__key__"] in seen:
                self.add("duplicate_key")
                continue
            seen.add(sample["__key__"])
            yield sample

    def take(self) -> dict[str, int]:
        out, self.counts = self.counts, {}
        return out


def tar_samples(counter: SkipCounter) -> list:
    """The WebDataset stages that turn a shard list into samples: the tar reader (our members only, errors
    counted by ``counter``), then repeated keys dropped."""
    import webdataset as wds
    return [wds.tarfile_to_samples(handler=counter.handler, select_files=select_member), counter.drop_repeated_keys]
