"""Synthetic relational scenes: real shards on disk, checked member by member."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.data.shards import read_manifest
from pipeline.data.tokenizer import iter_captions
from test_shards import members as tar_members
from pipeline.data.synthetic import (PALETTE, SHAPES, SPLITS, Caption, Fact, Scene, SceneObject, SyntheticConfig,
                                     build_synthetic_dataset, ensure_synthetic_dataset, load_synthetic_config,
                                     retrieval_ceiling)

CFG = SyntheticConfig(seed=3, train=60, val=6, test=24, relations=8, shard_samples=16)
RELATION_WORDS = {"left": "left", "right": "right", "above": "above", "top": "above",
                  "below": "below", "under": "below"}


def read_split(split_dir: Path) -> dict[str, dict]:
    out = {}
    for shard in read_manifest(split_dir)["shards"]:
        for key, members in tar_members(split_dir / shard["url"]).items():
            out[key] = {"meta": json.loads(members["json"]), "jpg": members["jpg"], "txt": members["txt"]}
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_synthetic_dataset(tmp_path_factory.mktemp("syn"), CFG, progress=False)


@pytest.fixture(scope="module")
def data(root) -> dict[str, dict[str, dict]]:
    return {split: read_split(root / split) for split in SPLITS}


def holds(rel: str, a: list[int], b: list[int]) -> bool:
    """Independent strict check of "a <rel> b" on [x1, y1, x2, y2] boxes."""
    return {"left": a[2] <= b[0], "right": b[2] <= a[0], "above": a[3] <= b[1], "below": b[3] <= a[1]}[rel]


def parse_relation(caption: str, word_objects: list[int]) -> tuple[str, int, int] | None:
    words = caption.split()
    rels = [RELATION_WORDS[w] for w in words if w in RELATION_WORDS]
    if not rels:
        return None
    order = list(dict.fromkeys(o for o in word_objects if o >= 0))
    assert len(rels) == 1 and len(order) == 2, caption
    return rels[0], order[0], order[1]


def find_object(objects: list[dict], size: str, color: str, shape: str) -> int:
    matches = [i for i, o in enumerate(objects)
               if (o["size"], o["color"], o["shape"]) == (size, color, shape)]
    assert len(matches) == 1
    return matches[0]


def test_manifests_match_tar_contents(root, data):
    assert SPLITS == ("train", "val", "test", "relations") and CFG.count("relations") == 2 * CFG.relations
    for split in SPLITS:
        manifest = read_manifest(root / split)
        assert manifest["split"] == split and manifest["samples"] == CFG.count(split)
        for shard in manifest["shards"]:
            path = root / split / shard["url"]
            assert len(tar_members(path)) == shard["samples"] <= CFG.shard_samples
            assert path.stat().st_size == shard["bytes"]
        assert sorted(data[split]) == [f"{split}-{i:08d}" for i in range(CFG.count(split))]
    assert [s["samples"] for s in read_manifest(root / "train")["shards"]] == [16, 16, 16, 12]
    info = json.loads((root / "dataset.json").read_text())
    assert info["config"] == CFG.to_dict() and load_synthetic_config(root) == CFG


def test_same_seed_gives_identical_bytes_and_other_seed_differs(root, tmp_path):
    again = build_synthetic_dataset(tmp_path / "again", CFG, progress=False)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert len(files) > 8
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = build_synthetic_dataset(tmp_path / "other", SyntheticConfig(seed=4, train=16, val=0, test=0,
                                                                        relations=0), progress=False)
    assert (other / "train/00000.tar").read_bytes() != (root / "train/00000.tar").read_bytes()


def test_changing_one_split_size_leaves_the_others_unchanged(root, tmp_path):
    bigger_val = build_synthetic_dataset(tmp_path, SyntheticConfig(**{**CFG.to_dict(), "val": 10}),
                                         progress=False)
    for split in ("train", "test", "relations"):
        for path in sorted((root / split).iterdir()):
            assert path.read_bytes() == (bigger_val / split / path.name).read_bytes(), path
    assert (root / "val/00000.tar").read_bytes() != (bigger_val / "val/00000.tar").read_bytes()


def test_annotations_are_consistent(data):
    seen = Counter()
    for split in data.values():
        for sample in split.values():
            meta = sample["meta"]
            image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(int)
            assert image.shape == (CFG.image_size, CFG.image_size, 3) == (meta["height"], meta["width"], 3)
            objects = meta["objects"]
            assert CFG.min_objects <= len(objects) <= CFG.max_objects
            for i, obj in enumerate(objects):
                x1, y1, x2, y2 = obj["box"]
                assert 0 <= x1 < x2 <= CFG.image_size and 0 <= y1 < y2 <= CFG.image_size
                for other in objects[i + 1:]:   # non-overlapping boxes
                    ox1, oy1, ox2, oy2 = other["box"]
                    assert x2 <= ox1 or ox2 <= x1 or y2 <= oy1 or oy2 <= y1
                centre = image[(y1 + y2) // 2, (x1 + x2) // 2]
                nearest = min(PALETTE, key=lambda c: np.abs(np.array(PALETTE[c]) - centre).sum())
                assert nearest == obj["color"], (obj, centre)
                seen[obj["shape"]] += 1
                seen[obj["color"]] += 1
                seen[obj["size"]] += 1
            assert len(meta["captions"]) == CFG.captions_per_image == len(meta["word_objects"])
            assert sample["txt"].decode() == meta["captions"][0]
            for caption, word_objects in zip(meta["captions"], meta["word_objects"]):
                words = caption.split()
                assert len(words) == len(word_objects)
                for word, index in zip(words, word_objects):
                    if index >= 0:   # annotated words are exactly the object's attribute words
                        obj = objects[index]
                        assert word in (obj["size"], obj["color"], obj["shape"])
    assert all(seen[name] > 0 for name in (*SHAPES, *PALETTE, "small", "large"))


def test_relational_captions_are_true_and_most_captions_relational(data):
    relational = total = 0
    for split in data.values():
        for sample in split.values():
            meta = sample["meta"]
            boxes = [o["box"] for o in meta["objects"]]
            for caption, word_objects in zip(meta["captions"], meta["word_objects"]):
                total += 1
                parsed = parse_relation(caption, word_objects)
                if parsed:
                    relational += 1
                    rel, a, b = parsed
                    assert holds(rel, boxes[a], boxes[b]), caption
                    assert not holds(rel, boxes[b], boxes[a]), caption
    assert relational / total >= 0.75


def test_only_the_relations_split_carries_quadruples(root):
    assert (root / "relations" / "quadruples.json").is_file()
    assert not any((root / s / "quadruples.json").exists() for s in ("train", "val", "test"))


@pytest.mark.parametrize("split", ["relations"])
def test_swap_quadruples_are_valid(root, data, split):
    test = data[split]
    quads = json.loads((root / split / "quadruples.json").read_text())
    assert len(quads) == CFG.count(split) // 2
    for q in quads:
        m0, m1 = test[q["image0"]]["meta"], test[q["image1"]]["meta"]
        assert m0["swap"]["partner"] == q["image1"] and m1["swap"]["partner"] == q["image0"]
        assert m0["captions"][m0["swap"]["caption"]] == q["caption0"]
        assert m1["captions"][m0["swap"]["partner_caption"]] == q["caption1"]
        assert q["caption1"] not in m0["captions"] and q["caption0"] not in m1["captions"]
        w0, w1 = q["caption0"].split(), q["caption1"].split()
        assert sorted(w0) == sorted(w1) and w0 != w1
        rel, a, b = parse_relation(q["caption0"], m0["word_objects"][m0["swap"]["caption"]])
        a_attr = (m0["objects"][a]["size"], m0["objects"][a]["color"], m0["objects"][a]["shape"])
        b_attr = (m0["objects"][b]["size"], m0["objects"][b]["color"], m0["objects"][b]["shape"])
        a1, b1 = find_object(m1["objects"], *a_attr), find_object(m1["objects"], *b_attr)
        box0, box1 = [o["box"] for o in m0["objects"]], [o["box"] for o in m1["objects"]]
        assert holds(rel, box0[a], box0[b]) and not holds(rel, box0[b], box0[a])    # C0 true, C1 false on I0
        # C1 true, C0 false on I1
        assert holds(rel, box1[b1], box1[a1]) and not holds(rel, box1[a1], box1[b1])
        assert parse_relation(q["caption1"], m1["word_objects"][0])[1:] == (b1, a1)


def test_iter_captions_reads_every_caption(root, data):
    captions = list(iter_captions([root / "train"]))
    assert len(captions) == CFG.train * CFG.captions_per_image
    assert captions[:5] == data["train"]["train-00000000"]["meta"]["captions"]


def test_ensure_builds_once_and_rebuilds_on_new_config(tmp_path):
    cfg = SyntheticConfig(train=8, val=2, test=4, relations=2, shard_samples=4)
    root = ensure_synthetic_dataset(tmp_path / "d", cfg, progress=False)
    stamp = (root / "train/00000.tar").stat().st_mtime_ns
    assert ensure_synthetic_dataset(root, cfg, progress=False) == root
    assert (root / "train/00000.tar").stat().st_mtime_ns == stamp
    bigger = SyntheticConfig(train=12, val=2, test=4, relations=2, shard_samples=4)
    ensure_synthetic_dataset(root, bigger, progress=False)
    assert read_manifest(root / "train")["samples"] == 12 and load_synthetic_config(root) == bigger


@pytest.mark.parametrize("bad", [
    {"min_objects": 1}, {"max_objects": 9}, {"shapes": ("circle", "blob")}, {"colors": ()},
    {"attribute_captions": 5}, {"image_size": 16}, {"train": -1}, {"small_frac": 0.3}, {"relations": -1},
])
def test_config_validation(bad):
    with pytest.raises(UserError, match="synthetic config: " + next(iter(bad))):
        SyntheticConfig(**bad)


def test_other_image_size_and_fewer_shapes(tmp_path):
    cfg = SyntheticConfig(train=6, val=0, test=2, image_size=64, shapes=("circle", "square", "cross", "star"),
                          max_objects=3, relations=2, shard_samples=50)
    root = build_synthetic_dataset(tmp_path, cfg, progress=False)
    train = read_split(root / "train")
    assert {o["shape"] for s in train.values() for o in s["meta"]["objects"]} <= set(cfg.shapes)
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (64, 64) for s in train.values())
    assert read_manifest(root / "val")["samples"] == 0


def _obj(kind: str, box: tuple[int, int, int, int]) -> SceneObject:
    size, color, shape = kind.split()
    return SceneObject(shape, color, size, box, PALETTE[color])


def test_retrieval_ceiling_counts_captions_true_of_another_image():
    red, blue = "small red circle", "large blue square"
    left = Scene((_obj(red, (0, 0, 10, 10)), _obj(blue, (40, 0, 60, 20))), (200, 200, 200))
    right = Scene((_obj(red, (50, 0, 60, 10)), _obj(blue, (0, 30, 20, 50))), (200, 200, 200))
    kinds = [o.kind() for o in left.objects]
    red_left_of_blue = Caption("a small red circle left of a large blue square", (), Fact(*kinds, "left"))
    red_and_blue = Caption("a small red circle and a large blue square", (), Fact(*kinds))
    blue_left_of_red = Caption("a large blue square left of a small red circle", (),
                               Fact(*kinds[::-1], "left"))
    ceiling = retrieval_ceiling([left, right], [[red_left_of_blue, red_and_blue], [red_and_blue]])
    # only the first caption is true of its own image alone; the attribute caption fits both images
    assert ceiling == {"t2i_r1_ceiling": 1 / 3, "i2t_r1_ceiling": 1 / 2, "relational": 1 / 3,
                       "relation_needed": 1 / 3}
    ceiling = retrieval_ceiling([left, right], [[red_left_of_blue], [blue_left_of_red]])
    keys = ("t2i_r1_ceiling", "i2t_r1_ceiling", "relational", "relation_needed")
    assert ceiling == dict.fromkeys(keys, 1.0)
