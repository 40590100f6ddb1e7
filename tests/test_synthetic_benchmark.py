"""The synthetic benchmark needs relations: captions identify their image only, val is drawn like test,
and the relation-swap quadruples cannot be solved from one object's position or from the caption's words.

Everything here is checked from the scene truth written in the shards (object boxes and attributes in
each sample's JSON), parsed independently of the generator's own code.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.data.synthetic import SyntheticConfig, build_synthetic_dataset
from test_synthetic import RELATION_WORDS, holds, read_split

# Default val / test / relations sizes; no train split (not needed here, and it is the slow part).
CFG = SyntheticConfig(train=0)
AXIS = {"left": 0, "right": 0, "above": 1, "below": 1}
FORWARD = {"left": -1, "right": 1, "above": -1, "below": 1}   # sign of the coordinate that "wins" R


def kind(obj: dict) -> tuple[str, str, str]:
    return obj["size"], obj["color"], obj["shape"]


def parse(caption: str, word_objects: list[int], objects: list[dict]) -> tuple:
    """(kinds named in order, relation or None) of a caption, from its words and word annotations."""
    rels = [RELATION_WORDS[w] for w in caption.split() if w in RELATION_WORDS]
    order = list(dict.fromkeys(o for o in word_objects if o >= 0))
    assert len(rels) <= 1 and 1 <= len(order) <= 2 and (not rels or len(order) == 2), caption
    return tuple(kind(objects[i]) for i in order), (rels[0] if rels else None)


def true_of(claim: tuple, objects: list[dict], with_relation: bool = True) -> bool:
    kinds, rel = claim
    boxes = {kind(o): o["box"] for o in objects}
    if not all(k in boxes for k in kinds):
        return False
    return rel is None or not with_relation or holds(rel, boxes[kinds[0]], boxes[kinds[1]])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_synthetic_dataset(tmp_path_factory.mktemp("bench"), CFG, progress=False)


@pytest.fixture(scope="module")
def splits(root) -> dict[str, dict[str, dict]]:
    return {split: read_split(root / split) for split in ("val", "test", "relations")}


def claims_of(split: dict[str, dict]) -> list[tuple[str, tuple]]:
    """(owner key, parsed caption) for every caption of the split."""
    out = []
    for key, sample in split.items():
        meta = sample["meta"]
        for caption, word_objects in zip(meta["captions"], meta["word_objects"]):
            out.append((key, parse(caption, word_objects, meta["objects"])))
    return out


def relation_needed_share(split: dict[str, dict]) -> float:
    """Share of captions naming a relation whose attribute-only reading also fits another image."""
    claims = claims_of(split)

    def fits_another(owner, claim):
        return any(key != owner and true_of(claim, s["meta"]["objects"], with_relation=False)
                   for key, s in split.items())

    needed = sum(1 for owner, claim in claims if claim[1] is not None and fits_another(owner, claim))
    return needed / len(claims)


@pytest.mark.parametrize("name", ["val", "test"])
def test_every_retrieval_caption_is_true_of_its_own_image_only(splits, name):
    split = splits[name]
    assert len(split) == CFG.count(name)
    for owner, claim in claims_of(split):
        holders = [key for key, s in split.items() if true_of(claim, s["meta"]["objects"])]
        assert holders == [owner], (owner, claim, holders)


def test_val_is_drawn_like_test(splits):
    val, test = relation_needed_share(splits["val"]), relation_needed_share(splits["test"])
    assert abs(val - test) <= 0.10, (val, test)
    assert min(val, test) >= 0.5   # most captions are only identified through their relation


def test_relations_split_has_default_quadruples_true_and_false_as_specified(root, splits):
    assert SyntheticConfig().relations >= 400 and CFG.relations == SyntheticConfig().relations
    quads = json.loads((root / "relations/quadruples.json").read_text())
    relations = splits["relations"]
    assert len(quads) == CFG.relations and len(relations) == 2 * CFG.relations
    assert len({q["image0"] for q in quads} | {q["image1"] for q in quads}) == 2 * len(quads)
    for q in quads:
        (m0, m1), (c0, c1) = quadruple_claims(q, relations)
        assert c1 == (c0[0][::-1], c0[1]) and c0[1] is not None   # the same relation, objects swapped
        assert sorted(q["caption0"].split()) == sorted(q["caption1"].split())
        assert true_of(c0, m0["objects"]) and not true_of(c1, m0["objects"])
        assert true_of(c1, m1["objects"]) and not true_of(c0, m1["objects"])


# --- rules that do not look at relations, scored like Winoground on the relations quadruples --------

def centre(obj: dict, axis: int) -> float:
    return (obj["box"][axis] + obj["box"][axis + 2]) / 2


def coordinate_rule(which: int, axis_of=lambda rel: AXIS[rel]):
    """Scores (caption, image) by one named object's coordinate: the first (``which`` 0) should lie far
    along R's direction ("left": small x), the second (1) far against it."""
    def score(claim, objects, size):
        kinds, rel = claim
        obj = next(o for o in objects if kind(o) == kinds[which])
        sign = FORWARD[rel] if which == 0 else -FORWARD[rel]
        return sign * centre(obj, axis_of(rel))
    return score


def centre_side_rule(claim, objects, size):
    """+1 if the first named object's centre is on R's side of the image centre, -1 on the other, 0 on it."""
    kinds, rel = claim
    obj = next(o for o in objects if kind(o) == kinds[0])
    offset = centre(obj, AXIS[rel]) - size / 2
    return FORWARD[rel] * math.copysign(1, offset) if offset else 0


def bag_of_words_rule(claim, objects, size):
    """Caption words that name an attribute of an object in the image, order ignored."""
    present = {w for o in objects for w in kind(o)}
    return sum(w in present for k in claim[0] for w in k)


def quadruple_claims(q: dict, relations: dict) -> tuple[list[dict], list[tuple]]:
    """The two images' metadata and the two parsed captions of a quadruple."""
    metas = [relations[q["image0"]]["meta"], relations[q["image1"]]["meta"]]
    claims = []
    for meta, caption in zip(metas, (q["caption0"], q["caption1"])):
        claims.append(parse(caption, meta["word_objects"][meta["captions"].index(caption)], meta["objects"]))
    return metas, claims


def winoground(quads, relations, rule) -> dict[str, float]:
    text = image = group = 0
    for q in quads:
        metas, claims = quadruple_claims(q, relations)
        s = [[rule(claims[i], metas[j]["objects"], metas[j]["width"]) for j in (0, 1)] for i in (0, 1)]
        t = s[0][0] > s[1][0] and s[1][1] > s[0][1]   # ties fail
        m = s[0][0] > s[0][1] and s[1][1] > s[1][0]
        text, image, group = text + t, image + m, group + (t and m)
    n = len(quads)
    return {"text": text / n, "image": image / n, "group": group / n}


def tolerance(p: float, n: int) -> float:
    """Upper half-width of the binomial 95% interval of a score at chance ``p`` over ``n`` quadruples
    (n=400: 0.042 at p=1/4, 0.037 at p=1/6, 0.049 at p=1/2), plus one point of slack."""
    return 1.96 * math.sqrt(p * (1 - p) / n) + 0.01


def single_caption_accuracy(quads, relations, rule, caption: int) -> float:
    """How often ``rule`` alone prefers the true image for caption ``caption`` of each quadruple."""
    hits = 0
    for q in quads:
        metas, claims = quadruple_claims(q, relations)
        s = [rule(claims[caption], metas[j]["objects"], metas[j]["width"]) for j in (0, 1)]
        hits += s[caption] > s[1 - caption]
    return hits / len(quads)


@pytest.fixture(scope="module")
def quads(root):
    return json.loads((root / "relations/quadruples.json").read_text())


PERPENDICULAR = {"left": 1, "right": 1, "above": 0, "below": 0}
RULES = {
    "first object's coordinate": coordinate_rule(0),
    "second object's coordinate": coordinate_rule(1),
    "first object's cross-axis coordinate": coordinate_rule(0, lambda rel: PERPENDICULAR[rel]),
    "first object's side of the centre": centre_side_rule,
    "bag of words": bag_of_words_rule,
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_position_rules_and_bag_of_words_score_no_better_than_chance(quads, splits, name):
    n = len(quads)
    scores = winoground(quads, splits["relations"], RULES[name])
    print(name, scores)
    assert scores["image"] <= 0.25 + tolerance(0.25, n), scores
    assert scores["group"] <= 1 / 6 + tolerance(1 / 6, n), scores
    # Within one image, the two captions' first objects are A and B: comparing their coordinates along R's
    # axis *is* the relation, so a coordinate rule's text score is 1 by construction; not a position leak.
    if name not in ("first object's coordinate", "second object's coordinate"):
        assert scores["text"] <= 0.25 + tolerance(0.25, n), scores


@pytest.mark.parametrize("name", ["first object's coordinate", "second object's coordinate",
                                  "first object's side of the centre"])
def test_one_objects_position_does_not_tell_which_image_a_caption_fits(quads, splits, name):
    """Each caption alone: whether its first (or second) object lies further along R's axis, or on R's side
    of the centre, in one image than in the other is a fair coin."""
    n = len(quads)
    for caption in (0, 1):
        accuracy = single_caption_accuracy(quads, splits["relations"], RULES[name], caption)
        assert abs(accuracy - 0.5) <= tolerance(0.5, n), (caption, accuracy)


def test_dataset_json_records_the_ceilings(root, splits):
    ceilings = json.loads((root / "dataset.json").read_text())["ceilings"]
    assert set(ceilings) == {"train", "val", "test", "relations"}
    for name in ("val", "test"):
        c = ceilings[name]
        assert c["t2i_r1_ceiling"] == c["i2t_r1_ceiling"] == 1.0
        assert c["relation_needed"] == pytest.approx(relation_needed_share(splits[name]))
        assert 0.5 <= c["relation_needed"] <= c["relational"] <= 1.0
