"""The embedded default data: synthetic relational scenes with captions, word->object annotations and
relation-swap quadruples, written as train / val / test / relations shards.

Every image shows 2-4 non-overlapping objects (shape x colour x size); (shape, colour) is unique within an
image, so "a small red circle" names exactly one object. Most captions relate two objects
("a small red circle to the left of a large blue square"); the rest only list objects. Relations are
strict: "A left of B" means A's box ends (in x) before B's begins, so the swapped caption is false.

Images come in twin pairs (every split is drawn by the same process). Both twins hold the same two
named objects A and B (same size words) in opposite order along one axis, plus their own random
distractors. The pair's relation caption "A <rel> B" is true of the first twin only and "B <rel> A" of
the second only: together they form a relation-swap quadruple (image0, caption0, image1, caption1).
Single-object position carries no usable signal: the relation axis (x or y) and word are random, and
per pair a fair coin picks the half of the image (along that axis, relative to the centre) that holds
both named objects in the first twin; the second twin uses the other half. So for either named object,
its side of the centre and whether it lies further along the axis in one twin than the other are fair
coins, and rules that score an image by one object's coordinate (or its side of the centre) win a
quadruple no more often than chance. No layout hides the relation from every one-object rule: with A
before B by a gap d in one twin and after it in the other, A's and B's mean shifts between the twins
add up to at least 2d. What remains here is distance from the centre: the pair's outer object is the
same one in both twins and follows from the side coin, so a rule reading one object's side *and* its
distance from the centre does solve most quadruples.

Captions are unique within a block of images (a whole val or test split; blocks of ``TRAIN_BLOCK``
images in train and relations, so every split has the same caption distribution): each caption is true
of its own image only, checked against the scene truth of every other image of the block, and a new
pair is redrawn if it would make an earlier caption true. So retrieval in val and test has a ceiling
of 1.0; ``retrieval_ceiling`` measures it (and the share of captions that need their relation to be
identified), and ``dataset.json`` records it per split.

The ``relations`` split holds ``relations`` pairs and their quadruples (``relations/quadruples.json``):
Winoground scores cost 4 pairs per quadruple, full retrieval images x captions, so the retrieval test
split stays small and plain (its twins' quadruples are not written). Each block is
drawn from its own generator seeded by (seed, split, block): the same config gives byte-identical
shards, and changing one split's size leaves the other splits unchanged.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import SYNTHETIC_COLORS, SYNTHETIC_GAP, SYNTHETIC_SHAPES, SyntheticConfig
from pipeline.errors import UserError
from pipeline.data.shards import MANIFEST_NAME, Sample, ShardWriter

SHAPES = SYNTHETIC_SHAPES
PALETTE = dict(zip(SYNTHETIC_COLORS, ((215, 35, 35), (35, 160, 55), (40, 75, 215), (235, 210, 35),
                                      (140, 55, 185), (240, 135, 25))))
SIZE_NAMES = ("small", "large")
SPLITS = ("train", "val", "test", "relations")
QUADRUPLE_SPLITS = ("relations",)   # splits that get a quadruples.json
UNIQUE_SPLITS = ("val", "test")           # captions unique over the whole split
TRAIN_BLOCK = 250                          # images per uniqueness block in the other splits
DATASET_FORMAT = "relalign-synthetic/2"
GAP = SYNTHETIC_GAP
MAX_PAIR_TRIES = 2000

# Phrases per relation "A <rel> B"; several wordings keep the templates varied with a tiny vocabulary.
RELATION_PHRASES = {
    "left": (("to", "the", "left", "of"), ("left", "of")),
    "right": (("to", "the", "right", "of"), ("right", "of")),
    "above": (("above",), ("on", "top", "of")),
    "below": (("below",), ("under",)),
}
RELATIONS = tuple(RELATION_PHRASES)
# "A <rel> B" holds when A comes first along the axis for left/above, second for right/below.
RELATION_AXIS = {"left": 0, "right": 0, "above": 1, "below": 1}
A_LEADS = {"left": True, "right": False, "above": True, "below": False}
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
PAIR_ATTRIBUTE_TEMPLATES = tuple(i for i, t in enumerate(ATTRIBUTE_TEMPLATES) if "B" in t)
SINGLE_ATTRIBUTE_TEMPLATES = tuple(i for i, t in enumerate(ATTRIBUTE_TEMPLATES) if "B" not in t)


# --- scenes ---------------------------------------------------------------------------------------

Kind = tuple[str, str, str]   # (size, colour, shape): what a caption's three attribute words name


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]   # x1, y1, x2, y2 in pixels, x2/y2 exclusive
    rgb: tuple[int, int, int]

    def words(self) -> Kind:
        return self.size, self.color, self.shape

    def kind(self) -> Kind:
        return self.words()

    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def annotation(self) -> dict:
        return {"box": list(self.box), "shape": self.shape, "color": self.color, "size": self.size}


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    _by_kind: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_kind", {o.kind(): o for o in self.objects})

    def find(self, kind: Kind) -> Optional[SceneObject]:
        return self._by_kind.get(kind)


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


def _random_rgb(rng: np.random.Generator, cfg: SyntheticConfig, color: str) -> tuple[int, int, int]:
    jitter = rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, size=3).tolist()
    return tuple(min(255, max(0, c + j)) for c, j in zip(PALETTE[color], jitter))


def _random_background(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = int(rng.integers(185, 236))
    tint = rng.integers(-8, 9, size=3).tolist()
    return tuple(min(255, max(0, grey + t)) for t in tint)


def _draw_kinds(rng: np.random.Generator, cfg: SyntheticConfig, n: int, exclude=()) -> list[Kind]:
    """``n`` kinds with (shape, colour) distinct from each other and from ``exclude``."""
    taken = {(k[2], k[1]) for k in exclude}
    combos = [(s, c) for s in cfg.shapes for c in cfg.colors if (s, c) not in taken]
    picks = rng.permutation(len(combos))[:n].tolist()
    sizes = rng.integers(2, size=n).tolist()
    return [(SIZE_NAMES[size], combos[p][1], combos[p][0]) for p, size in zip(picks, sizes)]


def _side_of(cfg: SyntheticConfig, kind: Kind) -> int:
    return cfg.side(SIZE_NAMES.index(kind[0]))


def _half_start_range(outer_side: int, inner_side: int, image_size: int) -> Optional[tuple[int, int]]:
    """Range of the inner object's start when two objects sit in the first half of an axis (both centres
    strictly before the image centre, the outer one first, GAP apart); None if they do not fit."""
    lowest = outer_side + GAP
    highest = (image_size - inner_side - 1) // 2   # 2 * start + inner_side < image_size
    return (lowest, highest) if lowest <= highest else None


def _place_in_half(rng: np.random.Generator, lead_side: int, trail_side: int, second_half: bool,
                   image_size: int) -> Optional[tuple[int, int]]:
    """Starts (lead, trail) along one axis with both centres in one half, lead before trail.

    Drawn in the first half and mirrored for the second, so the two halves are exact mirror images; in
    the first half the lead object is the outer one, in the second the trail object is.
    """
    outer, inner = (trail_side, lead_side) if second_half else (lead_side, trail_side)
    span = _half_start_range(outer, inner, image_size)
    if span is None:
        return None
    inner_start = int(rng.integers(span[0], span[1] + 1))
    outer_start = int(rng.integers(0, inner_start - outer - GAP + 1))
    if not second_half:
        return outer_start, inner_start
    return image_size - inner_start - inner, image_size - outer_start - outer


def _box(axis: int, along: int, across: int, side: int) -> tuple[int, int, int, int]:
    x1, y1 = (along, across) if axis == 0 else (across, along)
    return x1, y1, x1 + side, y1 + side


def _add_distractors(rng: np.random.Generator, cfg: SyntheticConfig, objects: list[SceneObject],
                     kinds: list[Kind]) -> bool:
    """Places ``kinds`` at random free spots (appending to ``objects``); False if one does not fit."""
    for kind in kinds:
        side = _side_of(cfg, kind)
        for _ in range(50):
            x1, y1 = (int(v) for v in rng.integers(0, cfg.image_size - side + 1, size=2))
            box = (x1, y1, x1 + side, y1 + side)
            if all(_separated(box, o.box) for o in objects):
                objects.append(SceneObject(kind[2], kind[1], kind[0], box, _random_rgb(rng, cfg, kind[1])))
                break
        else:
            return False
    return True


def sample_scene(rng: np.random.Generator, cfg: SyntheticConfig) -> Scene:
    """Random non-overlapping objects with distinct (shape, colour), anywhere in the image."""
    while True:
        objects: list[SceneObject] = []
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        if _add_distractors(rng, cfg, objects, _draw_kinds(rng, cfg, n)):
            return Scene(tuple(objects), _random_background(rng))


@dataclass(frozen=True)
class ScenePair:
    """Twin scenes: ``caption(0)`` ("A <rel> B") is true of scenes[0] only, ``caption(1)`` ("B <rel> A") of
    scenes[1] only. ``named[t]`` = (index of A, index of B) in scenes[t]."""

    scenes: tuple[Scene, Scene]
    named: tuple[tuple[int, int], tuple[int, int]]
    relation: str
    phrase: int
    template: int

    def caption(self, twin: int) -> "Caption":
        a, b = self.named[twin]
        first, second = (a, b) if twin == 0 else (b, a)
        return fill_template(RELATION_TEMPLATES[self.template], self.scenes[twin], first, second,
                             RELATION_PHRASES[self.relation][self.phrase], self.relation)


def _twin_scene(rng: np.random.Generator, cfg: SyntheticConfig, a: Kind, b: Kind, relation: str,
                a_leads: bool, second_half: bool) -> Optional[tuple[Scene, int, int]]:
    """A scene holding A and B in one half of the relation's axis (A first along it iff ``a_leads``) plus
    random distractors, objects in random order; None if the layout does not fit."""
    axis = RELATION_AXIS[relation]
    lead, trail = (a, b) if a_leads else (b, a)
    starts = _place_in_half(rng, _side_of(cfg, lead), _side_of(cfg, trail), second_half, cfg.image_size)
    if starts is None:
        return None
    named = []
    for kind, along in zip((lead, trail), starts):
        side = _side_of(cfg, kind)
        across = int(rng.integers(0, cfg.image_size - side + 1))
        named.append(SceneObject(kind[2], kind[1], kind[0], _box(axis, along, across, side),
                                 _random_rgb(rng, cfg, kind[1])))
    objects = list(named)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    if not _add_distractors(rng, cfg, objects, _draw_kinds(rng, cfg, n - 2, exclude=(a, b))):
        return None
    order = [int(i) for i in rng.permutation(len(objects))]
    shuffled = tuple(objects[i] for i in order)
    lead_index, trail_index = order.index(0), order.index(1)
    a_index, b_index = (lead_index, trail_index) if a_leads else (trail_index, lead_index)
    return Scene(shuffled, _random_background(rng)), a_index, b_index


def sample_pair(rng: np.random.Generator, cfg: SyntheticConfig) -> ScenePair:
    """Twin scenes for a relation-swap quadruple (see the module docstring for the layout)."""
    while True:
        a, b = _draw_kinds(rng, cfg, 2)
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        first_in_second_half = bool(rng.integers(2))
        twins = []
        for twin in (0, 1):
            a_leads = A_LEADS[relation] == (twin == 0)
            twins.append(_twin_scene(rng, cfg, a, b, relation, a_leads, first_in_second_half != (twin == 1)))
        if None in twins:
            continue   # the named pair does not fit in a half at these sizes: draw again
        return ScenePair((twins[0][0], twins[1][0]), ((twins[0][1], twins[0][2]), (twins[1][1], twins[1][2])),
                         relation, int(rng.integers(len(RELATION_PHRASES[relation]))),
                         int(rng.integers(len(RELATION_TEMPLATES))))


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


# --- captions and their truth ---------------------------------------------------------------------

@dataclass(frozen=True)
class Fact:
    """What a caption claims: kind ``a`` is present (and kind ``b``, and "a <relation> b" when given)."""

    a: Kind
    b: Optional[Kind] = None
    relation: Optional[str] = None

    def holds(self, scene: Scene) -> bool:
        first = scene.find(self.a)
        if first is None:
            return False
        if self.b is None:
            return True
        second = scene.find(self.b)
        if second is None:
            return False
        return self.relation is None or relation_holds(self.relation, first, second)

    def without_relation(self) -> "Fact":
        return Fact(self.a, self.b)


@dataclass(frozen=True)
class Caption:
    text: str
    word_objects: tuple[int, ...]   # object index per whitespace word, -1 if none
    fact: Optional[Fact] = None


def fill_template(template: tuple[str, ...], scene: Scene, a: int, b: int | None = None,
                  relation: tuple[str, ...] = (), relation_name: str | None = None) -> Caption:
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
    second = scene.objects[b].kind() if b is not None and "B" in template else None
    fact = Fact(scene.objects[a].kind(), second, relation_name if "R" in template else None)
    return Caption(" ".join(words), tuple(objects), fact)


class SplitTruth:
    """The scenes of a split (or block) and the facts its captions claim, indexed by the kinds they name,
    to answer "which scenes is this fact true of?" and "does this new scene make an old caption true?"."""

    def __init__(self) -> None:
        self.scenes: list[Scene] = []
        self._holding_kind: dict[Kind, set[int]] = {}
        self._claims: dict[tuple, list[Fact]] = {}

    def add_scene(self, scene: Scene) -> int:
        index = len(self.scenes)
        self.scenes.append(scene)
        for obj in scene.objects:
            self._holding_kind.setdefault(obj.kind(), set()).add(index)
        return index

    def add_claim(self, fact: Fact) -> None:
        self._claims.setdefault((fact.a, fact.b), []).append(fact)

    def holders(self, fact: Fact) -> list[int]:
        """Indices of the scenes ``fact`` is true of."""
        candidates = self._holding_kind.get(fact.a, set())
        if fact.b is not None:
            candidates = candidates & self._holding_kind.get(fact.b, set())
        return sorted(i for i in candidates if fact.holds(self.scenes[i]))

    def is_unique(self, fact: Fact, owner: int) -> bool:
        return self.holders(fact) == [owner]

    def contradicts(self, scene: Scene) -> bool:
        """True if a claimed fact holds in ``scene`` (adding it would make an earlier caption ambiguous)."""
        kinds = [o.kind() for o in scene.objects]
        keys = [(k, None) for k in kinds] + [(k, m) for k in kinds for m in kinds if k != m]
        return any(f.holds(scene) for key in keys for f in self._claims.get(key, ()))


def _true_facts(scene: Scene) -> tuple[list[Fact], list[Fact]]:
    """(relational, attribute-only) facts true of ``scene``; pairs are ordered."""
    relational, attribute = [], []
    for i, first in enumerate(scene.objects):
        attribute.append(Fact(first.kind()))
        for j, second in enumerate(scene.objects):
            if i != j:
                attribute.append(Fact(first.kind(), second.kind()))
                relational += [Fact(first.kind(), second.kind(), r) for r in RELATIONS
                               if relation_holds(r, first, second)]
    return relational, attribute


def _index_of(scene: Scene, kind: Optional[Kind]) -> Optional[int]:
    if kind is None:
        return None
    return next(i for i, o in enumerate(scene.objects) if o.kind() == kind)


def _wordings(fact: Fact) -> list[tuple[int, int]]:
    """(template, phrase) pairs that can say ``fact``; phrase -1 for attribute templates."""
    if fact.relation is not None:
        phrases = range(len(RELATION_PHRASES[fact.relation]))
        return [(t, p) for t in range(len(RELATION_TEMPLATES)) for p in phrases]
    templates = SINGLE_ATTRIBUTE_TEMPLATES if fact.b is None else PAIR_ATTRIBUTE_TEMPLATES
    return [(t, -1) for t in templates]


def _say(scene: Scene, fact: Fact, wording: tuple[int, int]) -> Caption:
    template, phrase = wording
    a, b = _index_of(scene, fact.a), _index_of(scene, fact.b)
    if fact.relation is None:
        return fill_template(ATTRIBUTE_TEMPLATES[template], scene, a, b)
    return fill_template(RELATION_TEMPLATES[template], scene, a, b, RELATION_PHRASES[fact.relation][phrase],
                         fact.relation)


def _pick_caption(rng: np.random.Generator, scene: Scene, facts: list[Fact],
                  taken: set[str]) -> Optional[Caption]:
    """A caption saying a random fact of ``facts`` in a random wording not in ``taken``; facts whose
    wordings are all taken are removed from ``facts``."""
    while facts:
        fact = facts[int(rng.integers(len(facts)))]
        wordings = _wordings(fact)
        for w in rng.permutation(len(wordings)):
            caption = _say(scene, fact, wordings[w])
            if caption.text not in taken:
                return caption
        facts.remove(fact)
    return None


def draw_captions(rng: np.random.Generator, scene: Scene, owner: int, truth: SplitTruth, cfg: SyntheticConfig,
                  fixed: tuple[Caption, ...] = ()) -> list[Caption]:
    """``fixed`` first, then captions true of ``truth.scenes[owner]`` only, in random order: up to
    ``attribute_captions`` that only list objects (fewer when no such caption is unique), the rest
    naming a relation. Each accepted fact is claimed in ``truth``."""
    relational, attribute = (
        [f for f in facts if truth.is_unique(f, owner)] for facts in _true_facts(scene))
    taken = {c.text for c in fixed}
    extra: list[Caption] = []
    want_attribute = min(cfg.attribute_captions, cfg.captions_per_image - len(fixed))
    for pool, count in ((attribute, want_attribute), (relational, None)):
        while len(extra) + len(fixed) < cfg.captions_per_image and (count is None or count > 0):
            caption = _pick_caption(rng, scene, pool, taken)
            if caption is None:
                break
            taken.add(caption.text)
            extra.append(caption)
            truth.add_claim(caption.fact)
            count = None if count is None else count - 1
    if len(extra) + len(fixed) < cfg.captions_per_image:
        raise UserError(f"synthetic data: an image has fewer than {cfg.captions_per_image} unique captions; "
                        "lower captions_per_image")
    order = rng.permutation(len(extra))
    return list(fixed) + [extra[i] for i in order]


# --- splits ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRecord:
    key: str
    scene: Scene
    captions: tuple[Caption, ...]
    partner: Optional[str]   # key of the twin when it is in the split


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def _block_rng(cfg: SyntheticConfig, split: str, block: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLITS.index(split), block])


def _accept_pair(rng: np.random.Generator, cfg: SyntheticConfig, truth: SplitTruth) -> ScenePair:
    """A pair whose scenes make no earlier caption true and whose swap captions hold nowhere else."""
    for _ in range(MAX_PAIR_TRIES):
        pair = sample_pair(rng, cfg)
        if any(truth.contradicts(s) for s in pair.scenes):
            continue
        if any(truth.holders(pair.caption(t).fact) for t in (0, 1)):
            continue
        return pair
    raise UserError(f"synthetic data: cannot draw {len(truth.scenes)}+ images with unique captions; "
                    "use smaller val/test splits or more shapes/colours")


def _draw_block(cfg: SyntheticConfig, split: str, block: int, first: int, count: int) -> list[ImageRecord]:
    """``count`` images (keys from ``first``) whose captions are true of their own image only within
    the block."""
    rng = _block_rng(cfg, split, block)
    truth = SplitTruth()
    records: list[ImageRecord] = []
    while len(records) < count:
        pair = _accept_pair(rng, cfg, truth)
        twins = 2 if count - len(records) >= 2 else 1
        keys = [sample_key(split, first + len(records) + t) for t in range(twins)]
        owners = [truth.add_scene(s) for s in pair.scenes]
        fixed = [pair.caption(t) for t in (0, 1)]
        for f in fixed:
            truth.add_claim(f.fact)
        for t in range(twins):
            captions = draw_captions(rng, pair.scenes[t], owners[t], truth, cfg, (fixed[t],))
            partner = keys[1 - t] if twins == 2 else None
            records.append(ImageRecord(keys[t], pair.scenes[t], tuple(captions), partner))
    return records


def draw_split(cfg: SyntheticConfig, split: str) -> list[ImageRecord]:
    """The split's images in key order; pairs (2k, 2k+1) are twins. Captions are unique over the whole
    split for val/test, within blocks of ``TRAIN_BLOCK`` images otherwise."""
    n = cfg.count(split)
    block = n if split in UNIQUE_SPLITS else TRAIN_BLOCK
    records: list[ImageRecord] = []
    for index, first in enumerate(range(0, n, max(block, 1))):
        records += _draw_block(cfg, split, index, first, min(block, n - first))
    return records


def quadruples_of(records: list[ImageRecord]) -> list[dict]:
    """quadruples.json entries: each twin pair's swap captions (caption 0 of each image)."""
    by_key = {r.key: r for r in records}
    out = []
    for r in records:
        if r.partner is not None and r.key < r.partner:
            other = by_key[r.partner]
            out.append({"image0": r.key, "caption0": r.captions[0].text,
                        "image1": other.key, "caption1": other.captions[0].text})
    return out


def _sample(cfg: SyntheticConfig, record: ImageRecord) -> Sample:
    buf = io.BytesIO()
    render(record.scene, cfg.image_size).save(buf, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
    meta = {
        "captions": [c.text for c in record.captions],
        "width": cfg.image_size, "height": cfg.image_size,
        "objects": [o.annotation() for o in record.scene.objects],
        "word_objects": [list(c.word_objects) for c in record.captions],
    }
    if record.partner is not None:
        meta["swap"] = {"partner": record.partner, "caption": 0, "partner_caption": 0}
    return Sample(key=record.key, image=buf.getvalue(), image_ext="jpg", meta=meta)


def split_samples(cfg: SyntheticConfig, split: str, quadruples: list | None = None) -> Iterator[Sample]:
    """The split's samples in key order. Images (2k, 2k+1) are relation-swap twins; their quadruples are
    appended to ``quadruples`` when given."""
    records = draw_split(cfg, split)
    if quadruples is not None:
        quadruples += quadruples_of(records)
    for record in records:
        yield _sample(cfg, record)


def retrieval_ceiling(scenes: list[Scene], captions: list[list[Caption]]) -> dict[str, float]:
    """R@1 a model that knows the scene truth can reach on a split, from the captions' facts.

    ``t2i_r1_ceiling``: share of captions true of their own image only; ``i2t_r1_ceiling``: share of
    images with at least one such caption; ``relational``: share of captions naming a relation;
    ``relation_needed``: share of captions naming a relation whose attribute-only reading ("there is an
    A and a B") is true of another image of the split, so that only the relation identifies the image.
    """
    truth = SplitTruth()
    for scene in scenes:
        truth.add_scene(scene)
    unique = relational = needed = total = images_found = 0
    for owner, caps in enumerate(captions):
        found = False
        for caption in caps:
            total += 1
            only_own = truth.is_unique(caption.fact, owner)
            unique += only_own
            found |= only_own
            if caption.fact.relation is not None:
                relational += 1
                needed += truth.holders(caption.fact.without_relation()) != [owner]
        images_found += found
    share = (lambda k, n: k / n if n else 1.0)
    return {"t2i_r1_ceiling": share(unique, total), "i2t_r1_ceiling": share(images_found, len(captions)),
            "relational": share(relational, total), "relation_needed": share(needed, total)}


def caption_vocabulary(cfg: SyntheticConfig) -> list[str]:
    words = {w for t in RELATION_TEMPLATES + ATTRIBUTE_TEMPLATES for w in t if w not in ("A", "B", "R")}
    words |= {w for phrases in RELATION_PHRASES.values() for p in phrases for w in p}
    return sorted(words | set(SIZE_NAMES) | set(cfg.shapes) | set(cfg.colors))


def build_synthetic_dataset(root: str | Path, cfg: SyntheticConfig | None = None,
                            progress: bool = True) -> Path:
    """Writes ``<root>/{train,val,test,relations}`` shards, ``{test,relations}/quadruples.json`` and, last,
    ``dataset.json`` (config, split sizes, vocabulary and the retrieval ceiling of every split)."""
    cfg = cfg or SyntheticConfig()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").unlink(missing_ok=True)
    splits, ceilings = {}, {}
    for split in SPLITS:
        records = draw_split(cfg, split)
        with ShardWriter(root / split, split, max_samples=cfg.shard_samples, total=len(records),
                         progress=progress) as writer:
            for record in records:
                writer.write(_sample(cfg, record))
        splits[split] = {"samples": len(records), "shards": len(writer.shards)}
        ceilings[split] = retrieval_ceiling([r.scene for r in records], [list(r.captions) for r in records])
        if split in QUADRUPLE_SPLITS:
            quadruples = quadruples_of(records)
            splits[split]["quadruples"] = len(quadruples)
            _write_json(root / split / "quadruples.json", quadruples)
    _write_json(root / "dataset.json", {"format": DATASET_FORMAT, "config": cfg.to_dict(), "splits": splits,
                                        "ceilings": ceilings, "vocabulary": caption_vocabulary(cfg)})
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
            and all((root / s / "quadruples.json").is_file() for s in QUADRUPLE_SPLITS))


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
