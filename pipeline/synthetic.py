"""The embedded default data: synthetic relational scenes with captions, word->object annotations and
relation-swap quadruples, written as train/val/test shards.

Every image shows 2-4 non-overlapping objects (shape x colour x size); (shape, colour) is unique within an
image, so "a small red circle" names exactly one object. Most captions relate two objects
("a small red circle to the left of a large blue square"); the rest only list objects. Relations are
strict: "A left of B" means A's box ends (in x) before B's begins, so the swapped caption is false.
Each image is drawn from its own generator seeded by (seed, split, index): the same config gives
byte-identical shards, and changing one split's size leaves the others' images unchanged.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import UserError
from pipeline.shards import MANIFEST_NAME, Sample, ShardWriter

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
PALETTE = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 75, 215),
    "yellow": (235, 210, 35), "purple": (140, 55, 185), "orange": (240, 135, 25),
}
SIZE_NAMES = ("small", "large")
SPLITS = ("train", "val", "test")
DATASET_FORMAT = "relalign-synthetic/1"
GAP = 2  # min pixels between object boxes

# Phrases per relation "A <rel> B"; several wordings keep the templates varied with a tiny vocabulary.
RELATION_PHRASES = {
    "left": (("to", "the", "left", "of"), ("left", "of")),
    "right": (("to", "the", "right", "of"), ("right", "of")),
    "above": (("above",), ("on", "top", "of")),
    "below": (("below",), ("under",)),
}
# "A" / "B" expand to "<size> <colour> <shape>" of an object, "R" to a relation phrase.
RELATION_TEMPLATES = (
    ("a", "A", "R", "a", "B"),
    ("a", "A", "is", "R", "a", "B"),
    ("the", "A", "is", "R", "the", "B"),
    ("there", "is", "a", "A", "R", "a", "B"),
    ("a", "picture", "of", "a", "A", "R", "a", "B"),
)
ATTRIBUTE_TEMPLATES = (
    ("a", "A", "and", "a", "B"),
    ("there", "is", "a", "A", "and", "a", "B"),
    ("a", "picture", "of", "a", "A", "and", "a", "B"),
    ("a", "picture", "with", "a", "A"),
)


def _opt(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the synthetic dataset (stored in ``<root>/dataset.json``)."""

    seed: int = _opt(0, "random seed; the same seed gives byte-identical shards")
    train: int = _opt(5000, "images in the train split")
    val: int = _opt(250, "images in the val split")
    test: int = _opt(250, "images in the test split (pairs of relation-swapped images)")
    image_size: int = _opt(96, "image width = height in pixels")
    min_objects: int = _opt(2, "fewest objects per image (>= 2)")
    max_objects: int = _opt(4, "most objects per image")
    captions_per_image: int = _opt(5, "captions per image")
    attribute_captions: int = _opt(1, "of those, captions that only list objects (the rest name a relation)")
    shapes: tuple[str, ...] = _opt(SHAPES, "shapes to draw")
    colors: tuple[str, ...] = _opt(tuple(PALETTE), "colours to use")
    small_frac: float = _opt(0.17, "side of a small object as a fraction of image_size")
    large_frac: float = _opt(0.27, "side of a large object as a fraction of image_size")
    color_jitter: int = _opt(12, "max per-channel deviation from the named colour")
    jpeg_quality: int = _opt(95, "JPEG quality of the stored images")
    shard_samples: int = _opt(500, "images per tar shard")

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "colors", tuple(self.colors))
        _validate(self)

    def side(self, size_index: int) -> int:
        return max(6, round((self.small_frac, self.large_frac)[size_index] * self.image_size))

    def count(self, split: str) -> int:
        return {"train": self.train, "val": self.val, "test": self.test}[split]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "SyntheticConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(f"synthetic config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


def _validate(cfg: SyntheticConfig) -> None:
    def bad(field_name: str, why: str) -> UserError:
        return UserError(f"synthetic config: {field_name}={getattr(cfg, field_name)!r} {why}")

    for name in ("seed", "train", "val", "test"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 0:
            raise bad(name, "must be an integer >= 0")
    if not 32 <= cfg.image_size <= 1024:
        raise bad("image_size", "must be in 32..1024")
    if not 2 <= cfg.min_objects <= cfg.max_objects:
        raise bad("min_objects", f"must be >= 2 and <= max_objects ({cfg.max_objects})")
    if not cfg.shapes or len(set(cfg.shapes)) != len(cfg.shapes) or set(cfg.shapes) - set(SHAPES):
        raise bad("shapes", f"must be distinct names from {', '.join(SHAPES)}")
    if not cfg.colors or len(set(cfg.colors)) != len(cfg.colors) or set(cfg.colors) - set(PALETTE):
        raise bad("colors", f"must be distinct names from {', '.join(PALETTE)}")
    if cfg.max_objects > len(cfg.shapes) * len(cfg.colors):
        raise bad("max_objects", "exceeds the number of distinct (shape, colour) pairs")
    if not 0.05 <= cfg.small_frac < cfg.large_frac <= 0.4:
        raise bad("small_frac", f"and large_frac={cfg.large_frac} need 0.05 <= small < large <= 0.4")
    if cfg.max_objects * (cfg.side(1) + GAP) ** 2 > 0.4 * cfg.image_size ** 2:
        raise bad("max_objects", "large objects do not fit the image: lower it or large_frac")
    if cfg.captions_per_image < 1:
        raise bad("captions_per_image", "must be >= 1")
    if not 0 <= cfg.attribute_captions < cfg.captions_per_image:
        raise bad("attribute_captions", f"must be in 0..captions_per_image-1 ({cfg.captions_per_image - 1})")
    if not 0 <= cfg.color_jitter <= 30:
        raise bad("color_jitter", "must be in 0..30")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise bad("jpeg_quality", "must be in 1..100")
    if cfg.shard_samples < 1:
        raise bad("shard_samples", "must be >= 1")


# --- scenes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]   # x1, y1, x2, y2 in pixels, x2/y2 exclusive
    rgb: tuple[int, int, int]

    def words(self) -> tuple[str, str, str]:
        return self.size, self.color, self.shape

    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def annotation(self) -> dict:
        return {"box": list(self.box), "shape": self.shape, "color": self.color, "size": self.size}


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]


def _separated(a: tuple, b: tuple) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def relation_holds(rel: str, a: SceneObject, b: SceneObject) -> bool:
    """Strict spatial relation "a <rel> b" between boxes (image y grows downwards)."""
    if rel == "left":
        return a.box[2] <= b.box[0]
    if rel == "right":
        return b.box[2] <= a.box[0]
    if rel == "above":
        return a.box[3] <= b.box[1]
    return b.box[3] <= a.box[1]


def sample_scene(rng: np.random.Generator, cfg: SyntheticConfig) -> Scene:
    """Random non-overlapping objects with distinct (shape, colour); retries until they fit."""
    size = cfg.image_size
    while True:
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        combos = rng.choice(len(cfg.shapes) * len(cfg.colors), size=n, replace=False)
        objects: list[SceneObject] = []
        for combo in combos:
            shape, color = cfg.shapes[combo // len(cfg.colors)], cfg.colors[combo % len(cfg.colors)]
            size_index = int(rng.integers(2))
            side = cfg.side(size_index)
            jitter = rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, size=3)
            rgb = tuple(int(v) for v in np.clip(np.array(PALETTE[color]) + jitter, 0, 255))
            for _ in range(50):
                x1, y1 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
                box = (x1, y1, x1 + side, y1 + side)
                if all(_separated(box, o.box) for o in objects):
                    objects.append(SceneObject(shape, color, SIZE_NAMES[size_index], box, rgb))
                    break
            else:
                break
        if len(objects) == n:
            grey = int(rng.integers(185, 236))
            tint = rng.integers(-8, 9, size=3)
            return Scene(tuple(objects), tuple(int(v) for v in np.clip(grey + tint, 0, 255)))


def render(scene: Scene, image_size: int) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x1, y1, x2, y2 = obj.box[0], obj.box[1], obj.box[2] - 1, obj.box[3] - 1
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    fill = obj.rgb
    if obj.shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif obj.shape == "cross":
        t = max(2.0, (x2 - x1) / 3) / 2
        draw.rectangle((x1, cy - t, x2, cy + t), fill=fill)
        draw.rectangle((cx - t, y1, cx + t, y2), fill=fill)
    else:  # star: 5 points, inner radius 0.45 of outer, first point up
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(cx + q * np.cos(t), cy - q * np.sin(t)) for q, t in zip(radii, angles)], fill=fill)


# --- captions -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Caption:
    text: str
    word_objects: tuple[int, ...]   # object index per whitespace word, -1 if none


def fill_template(template: tuple[str, ...], scene: Scene, a: int, b: int | None = None,
                  relation: tuple[str, ...] = ()) -> Caption:
    """Expands A/B to the objects' attribute words (annotated with their index) and R to ``relation``.

    Articles and relation words are not annotated: only the words that describe an object point at it.
    """
    words: list[str] = []
    objects: list[int] = []
    for token in template:
        if token in ("A", "B"):
            index = a if token == "A" else b
            words += scene.objects[index].words()
            objects += [index] * 3
        elif token == "R":
            words += relation
            objects += [-1] * len(relation)
        else:
            words.append(token)
            objects.append(-1)
    return Caption(" ".join(words), tuple(objects))


@dataclass(frozen=True)
class RelationChoice:
    a: int
    b: int
    relation: str
    phrase: int
    template: int

    def caption(self, scene: Scene, swapped: bool = False) -> Caption:
        a, b = (self.b, self.a) if swapped else (self.a, self.b)
        phrase = RELATION_PHRASES[self.relation][self.phrase]
        return fill_template(RELATION_TEMPLATES[self.template], scene, a, b, phrase)


def random_relation(rng: np.random.Generator, scene: Scene) -> RelationChoice:
    """A random true relation between two distinct objects, with a random wording."""
    n = len(scene.objects)
    a, b = (int(v) for v in rng.choice(n, size=2, replace=False))
    valid = [r for r in RELATION_PHRASES if relation_holds(r, scene.objects[a], scene.objects[b])]
    relation = valid[int(rng.integers(len(valid)))]
    return RelationChoice(a, b, relation, int(rng.integers(len(RELATION_PHRASES[relation]))),
                          int(rng.integers(len(RELATION_TEMPLATES))))


def random_attribute_caption(rng: np.random.Generator, scene: Scene) -> Caption:
    template = ATTRIBUTE_TEMPLATES[int(rng.integers(len(ATTRIBUTE_TEMPLATES)))]
    a, b = (int(v) for v in rng.choice(len(scene.objects), size=2, replace=False))
    return fill_template(template, scene, a, b)


def make_captions(rng: np.random.Generator, scene: Scene, cfg: SyntheticConfig,
                  fixed: tuple[Caption, ...] = ()) -> list[Caption]:
    """``fixed`` first (they count as relational), then distinct random captions in random order."""
    seen = {c.text for c in fixed}
    extra: list[Caption] = []
    wanted = ((cfg.captions_per_image - cfg.attribute_captions - len(fixed), True),
              (cfg.attribute_captions, False))
    for count, relational in wanted:
        for _ in range(100 * max(count, 1)):
            if count <= 0:
                break
            if relational:
                cap = random_relation(rng, scene).caption(scene)
            else:
                cap = random_attribute_caption(rng, scene)
            if cap.text not in seen:
                seen.add(cap.text)
                extra.append(cap)
                count -= 1
    order = rng.permutation(len(extra))
    return list(fixed) + [extra[i] for i in order]


def swap_scene(scene: Scene, a: int, b: int) -> Scene | None:
    """The scene with objects a and b exchanging centres, or None if that overlaps or leaves the image."""
    (ax, ay), (bx, by) = scene.objects[a].center(), scene.objects[b].center()
    moved = list(scene.objects)
    for i, (cx, cy) in ((a, (bx, by)), (b, (ax, ay))):
        obj = scene.objects[i]
        side = obj.box[2] - obj.box[0]
        x1, y1 = int(np.floor(cx - side / 2)), int(np.floor(cy - side / 2))
        moved[i] = replace(obj, box=(x1, y1, x1 + side, y1 + side))
    return Scene(tuple(moved), scene.background)


def _valid_scene(scene: Scene, image_size: int) -> bool:
    objs = scene.objects
    inside = all(o.box[0] >= 0 and o.box[1] >= 0 and o.box[2] <= image_size and o.box[3] <= image_size
                 for o in objs)
    return inside and all(_separated(objs[i].box, objs[j].box)
                          for i in range(len(objs)) for j in range(i + 1, len(objs)))


def sample_swap_pair(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[Scene, Scene, RelationChoice]:
    """Scenes I0, I1 and a relation with C0 = choice.caption(I0) true of I0 only and
    C1 = choice.caption(I1, swapped=True) true of I1 only."""
    while True:
        scene0 = sample_scene(rng, cfg)
        choice = random_relation(rng, scene0)
        scene1 = swap_scene(scene0, choice.a, choice.b)
        if _valid_scene(scene1, cfg.image_size) and relation_holds(
                choice.relation, scene1.objects[choice.b], scene1.objects[choice.a]):
            return scene0, scene1, choice


# --- samples and dataset --------------------------------------------------------------------------

def _rng(cfg: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLITS.index(split), index])


def _sample(cfg: SyntheticConfig, key: str, scene: Scene, captions: list[Caption],
            swap: dict | None) -> Sample:
    buf = io.BytesIO()
    render(scene, cfg.image_size).save(buf, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
    meta = {
        "captions": [c.text for c in captions],
        "width": cfg.image_size, "height": cfg.image_size,
        "objects": [o.annotation() for o in scene.objects],
        "word_objects": [list(c.word_objects) for c in captions],
    }
    if swap is not None:
        meta["swap"] = swap
    return Sample(key=key, image=buf.getvalue(), image_ext="jpg", meta=meta)


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def split_samples(cfg: SyntheticConfig, split: str, quadruples: list | None = None) -> Iterator[Sample]:
    """The split's samples in key order. In the test split, images (2k, 2k+1) are relation-swap pairs
    (their quadruples are appended to ``quadruples`` when given)."""
    n = cfg.count(split)
    index = 0
    while index < n:
        if split == "test" and index + 1 < n:
            rng = _rng(cfg, split, index)
            scene0, scene1, choice = sample_swap_pair(rng, cfg)
            k0, k1 = sample_key(split, index), sample_key(split, index + 1)
            c0, c1 = choice.caption(scene0), choice.caption(scene1, swapped=True)
            link = {"caption": 0, "partner_caption": 0}
            yield _sample(cfg, k0, scene0, make_captions(rng, scene0, cfg, (c0,)), {"partner": k1, **link})
            yield _sample(cfg, k1, scene1, make_captions(rng, scene1, cfg, (c1,)), {"partner": k0, **link})
            if quadruples is not None:
                quadruples.append({"image0": k0, "caption0": c0.text, "image1": k1, "caption1": c1.text})
            index += 2
        else:
            rng = _rng(cfg, split, index)
            scene = sample_scene(rng, cfg)
            yield _sample(cfg, sample_key(split, index), scene, make_captions(rng, scene, cfg), None)
            index += 1


def caption_vocabulary(cfg: SyntheticConfig) -> list[str]:
    words = {w for t in RELATION_TEMPLATES + ATTRIBUTE_TEMPLATES for w in t if w not in ("A", "B", "R")}
    words |= {w for phrases in RELATION_PHRASES.values() for p in phrases for w in p}
    return sorted(words | set(SIZE_NAMES) | set(cfg.shapes) | set(cfg.colors))


def build_synthetic_dataset(root: str | Path, cfg: SyntheticConfig | None = None,
                            progress: bool = True) -> Path:
    """Writes ``<root>/{train,val,test}`` shards, ``test/quadruples.json`` and, last, ``dataset.json``."""
    cfg = cfg or SyntheticConfig()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").unlink(missing_ok=True)
    splits = {}
    for split in SPLITS:
        quadruples: list[dict] = []
        with ShardWriter(root / split, split, max_samples=cfg.shard_samples, total=cfg.count(split),
                         progress=progress) as writer:
            for sample in split_samples(cfg, split, quadruples):
                writer.write(sample)
        splits[split] = {"samples": cfg.count(split), "shards": len(writer.shards)}
        if split == "test":
            _write_json(root / split / "quadruples.json", quadruples)
    _write_json(root / "dataset.json", {"format": DATASET_FORMAT, "config": cfg.to_dict(),
                                        "splits": splits, "vocabulary": caption_vocabulary(cfg)})
    return root


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def dataset_is_current(root: str | Path, cfg: SyntheticConfig) -> bool:
    root = Path(root)
    try:
        info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (isinstance(info, dict) and info.get("format") == DATASET_FORMAT
            and info.get("config") == cfg.to_dict()
            and all((root / s / MANIFEST_NAME).is_file() for s in SPLITS)
            and (root / "test" / "quadruples.json").is_file())


def ensure_synthetic_dataset(root: str | Path, cfg: SyntheticConfig | None = None,
                             progress: bool = True) -> Path:
    """Builds the dataset under ``root`` unless ``dataset.json`` there already records ``cfg``.

    Safe to call from several processes at once: builders serialise on a lock file in ``root``.
    """
    cfg = cfg or SyntheticConfig()
    root = Path(root)
    if dataset_is_current(root, cfg):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dataset_is_current(root, cfg):
            build_synthetic_dataset(root, cfg, progress=progress)
    return root


def load_synthetic_config(root: str | Path) -> SyntheticConfig:
    """The config a dataset under ``root`` was generated with."""
    path = Path(root) / "dataset.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no synthetic dataset at {root} ({path} missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read JSON {path}: {e}") from None
    return SyntheticConfig.from_dict(info.get("config", {}))
