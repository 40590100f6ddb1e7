"""Shard writing from every source, manifests, atomicity, region features and the CLI's errors."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.data.shards import Sample, ShardWriter, read_manifest, shard_paths, write_split
from pipeline.data.sources import (ImageOptions, karpathy_entries, karpathy_samples, load_region_features,
                                   read_karpathy, read_table, table_samples)
from pipeline.data.tokenizer import iter_captions

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
import make_shards  # noqa: E402


def members(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def split_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for path in shard_paths(split_dir):
        out.update(members(path))
    return out


def noise_sample(key: str, nbytes: int = 3000, caption: str = "a caption") -> Sample:
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return Sample(key=key, image=rng.bytes(nbytes), image_ext="jpg",
                  meta={"captions": [caption, caption + " two"], "width": 4, "height": 4})


def make_image(path: Path, size=(40, 30), color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_npz(path: Path, n=3, d=8, image_size=(40, 30), **override) -> np.ndarray:
    arrays = {"features": np.arange(n * d, dtype=np.float32).reshape(n, d),
              "boxes": np.tile(np.array([[2, 4, 20, 24]], dtype=np.float32), (n, 1)),
              "image_size": np.array(image_size)}
    arrays.update(override)
    np.savez(path, **arrays)
    return arrays["features"]


# --- writer ---------------------------------------------------------------------------------------

def test_count_limit_manifest_and_members(tmp_path):
    manifest = write_split((noise_sample(f"k{i:03d}") for i in range(10)), tmp_path, "train",
                           max_samples=3, progress=False)
    assert manifest["format"] == "relalign-shards/1" and manifest["samples"] == 10
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert [s["url"] for s in manifest["shards"]] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert manifest["has_regions"] is False and read_manifest(tmp_path / "manifest.json") == manifest
    first = members(tmp_path / "00000.tar")
    assert list(first) == ["k000", "k001", "k002"]
    assert set(first["k000"]) == {"jpg", "json", "txt"}
    meta = json.loads(first["k000"]["json"])
    assert meta["image_id"] == "k000" and first["k000"]["txt"] == b"a caption"
    urls = [s["url"] for s in manifest["shards"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == urls + ["manifest.json"]


def test_byte_limit_keeps_shards_under_it(tmp_path):
    limit = 40 * 1024
    manifest = write_split((noise_sample(f"k{i:03d}", 6000) for i in range(20)), tmp_path, "val",
                           max_samples=None, max_bytes=limit, progress=False)
    assert len(manifest["shards"]) > 3 and manifest["samples"] == 20
    for shard in manifest["shards"]:
        path = tmp_path / shard["url"]
        assert path.stat().st_size == shard["bytes"] <= limit
        assert len(members(path)) == shard["samples"]


def test_rewrite_removes_stale_shards_and_failure_leaves_no_manifest(tmp_path):
    write_split((noise_sample(f"a{i}") for i in range(9)), tmp_path, "train", max_samples=2, progress=False)
    write_split((noise_sample(f"b{i}") for i in range(3)), tmp_path, "train", max_samples=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert set(split_samples(tmp_path)) == {"b0", "b1", "b2"}

    def failing():
        yield noise_sample("c0")
        yield noise_sample("c1")
        raise RuntimeError("source broke")
    with pytest.raises(RuntimeError):
        write_split(failing(), tmp_path, "train", max_samples=5, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(UserError, match="no shard manifest"):
        read_manifest(tmp_path)


def test_writer_rejects_bad_samples(tmp_path):
    with ShardWriter(tmp_path, "train", progress=False) as writer:
        writer.write(noise_sample("x"))
        with pytest.raises(UserError, match="duplicate sample key 'x'"):
            writer.write(noise_sample("x"))
        with pytest.raises(UserError, match="key 'a.b'"):
            writer.write(noise_sample("a.b"))
        with pytest.raises(UserError, match="non-empty caption"):
            writer.write(Sample("y", b"..", "jpg", {"captions": [], "width": 1, "height": 1}))
    assert read_manifest(tmp_path)["samples"] == 1


def test_read_manifest_names_bad_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"cannot read shard manifest .*manifest.json"):
        read_manifest(tmp_path)


def test_iter_captions_on_img2dataset_layout(tmp_path):
    """img2dataset writes key.jpg / key.txt / key.json (with 'caption') and no manifest."""
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, (txt, meta) in enumerate([("first dog", {"caption": "first dog", "status": "success"}),
                                         ("only txt", None), ("cat", {"captions": ["cat", "a cat"]})]):
            files = {"jpg": b"\xff\xd8", "txt": txt.encode()}
            if meta is not None:
                files["json"] = json.dumps(meta).encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert list(iter_captions([tmp_path])) == ["first dog", "only txt", "cat", "a cat"]


# --- sources --------------------------------------------------------------------------------------

@pytest.fixture
def karpathy(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    make_image(images / "a.jpg")
    make_image(images / "val2014" / "b.png")
    make_image(images / "c.bmp", fmt="BMP")
    make_image(images / "d.jpg", size=(120, 60))
    entries = [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A red box."}, {"raw": "red"}]},
        {"filename": "b.png", "filepath": "val2014", "split": "restval", "sentences": [{"raw": "b one"}]},
        {"filename": "c.bmp", "split": "val", "sentences": [{"raw": "c one"}, {"raw": "c two"}]},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "d one"}]},
    ]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path, images


def test_karpathy_cli_writes_every_split(karpathy, tmp_path):
    path, images = karpathy
    out = tmp_path / "shards"
    assert make_shards.main(["karpathy", "--json", str(path), "--images", str(images), "--out", str(out),
                             "--max-samples", "1", "--quiet"]) == 0
    assert {d.name for d in out.iterdir()} == {"train", "val", "test"}
    train = split_samples(out / "train")
    assert read_manifest(out / "train")["samples"] == 2 and len(shard_paths(out / "train")) == 2
    assert set(train) == {"a", "val2014_b"} and "png" in train["val2014_b"]
    meta = json.loads(train["a"]["json"])
    assert meta["captions"] == ["A red box.", "red"] and meta["image_id"] == "a.jpg"
    assert (meta["width"], meta["height"]) == (40, 30)
    assert train["a"]["jpg"] == (images / "a.jpg").read_bytes()       # passed through untouched
    val = split_samples(out / "val")
    assert Image.open(io.BytesIO(val["c"]["jpg"])).format == "JPEG"  # BMP re-encoded


def test_karpathy_max_side_and_region_features_round_trip(karpathy, tmp_path):
    path, images = karpathy
    feats_dir = tmp_path / "feats"
    feats_dir.mkdir()
    feats = write_npz(feats_dir / "d.npz", image_size=(120, 60))
    opts = ImageOptions(max_side=60, features_dir=feats_dir)
    entries = karpathy_entries(read_karpathy(path), ["test"])
    manifest = write_split(karpathy_samples(entries, images, opts), tmp_path / "test", "test", progress=False)
    assert manifest["has_regions"] is True
    sample = split_samples(tmp_path / "test")["d"]
    assert Image.open(io.BytesIO(sample["jpg"])).size == (60, 30)
    with np.load(io.BytesIO(sample["npz"]), allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["features"], feats)
        np.testing.assert_allclose(npz["boxes"], np.tile([[1, 2, 10, 12]], (3, 1)))  # halved with the image
        assert npz["image_size"].tolist() == [60, 30]


@pytest.mark.parametrize("override, message", [
    ({"boxes": np.zeros((2, 4))}, "'boxes' must be \\[3, 4\\]"),
    ({"features": np.zeros(5)}, "'features' must be a numeric \\[n, d\\]"),
    ({"image_size": np.array([0, 3])}, "'image_size' must be 2 positive"),
])
def test_region_feature_validation(tmp_path, override, message):
    write_npz(tmp_path / "x.npz", **override)
    with pytest.raises(UserError, match=message):
        load_region_features(tmp_path / "x.npz", (40, 30))
    np.savez(tmp_path / "y.npz", features=np.zeros((1, 2)))
    with pytest.raises(UserError, match="missing array.*boxes, image_size"):
        load_region_features(tmp_path / "y.npz", (40, 30))


def test_karpathy_errors(karpathy, tmp_path):
    path, images = karpathy
    with pytest.raises(UserError, match="unknown Karpathy split trainval .*valid: train, restval, val, test"):
        karpathy_entries(read_karpathy(path), ["trainval"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(UserError, match=f"cannot read JSON {bad}"):
        read_karpathy(bad)
    entry = {"filename": "a.jpg", "split": "dev", "sentences": [{"raw": "x"}]}
    bad.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(UserError, match="unknown split 'dev'"):
        read_karpathy(bad)
    with pytest.raises(UserError, match="region features not found: .*a.npz"):
        list(karpathy_samples(karpathy_entries(read_karpathy(path), ["train"]), images,
                              ImageOptions(features_dir=tmp_path)))


def test_cli_missing_image_exits_2_naming_path(karpathy, tmp_path):
    path, images = karpathy
    (images / "d.jpg").unlink()
    result = subprocess.run(
        [sys.executable, "launch/make_shards.py", "karpathy", "--json", str(path), "--images", str(images),
         "--out", str(tmp_path / "out"), "--split", "test=test", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    expected = f"error: image not found: {images / 'd.jpg'} (check the image root / paths in the input)"
    assert result.stderr.strip().splitlines()[-1] == expected
    assert not (tmp_path / "out/test/manifest.json").exists()


def test_cli_unknown_split_and_bad_table_exit_2(karpathy, tmp_path, capsys):
    path, images = karpathy
    assert make_shards.main(["karpathy", "--json", str(path), "--images", str(images),
                             "--out", str(tmp_path), "--split", "train=train+dev"]) == 2
    assert "unknown Karpathy split dev (valid: train, restval, val, test)" in capsys.readouterr().err
    table = tmp_path / "t.csv"
    table.write_text("path,text\na.jpg,hello\n")
    assert make_shards.main(["table", "--input", str(table), "--images", str(images),
                             "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no column 'image'" in err and str(table) in err


def test_csv_tsv_jsonl_tables(tmp_path):
    images = tmp_path / "img"
    for name in ("a.jpg", "b.jpg", "c.png"):
        make_image(images / name)
    (tmp_path / "t.csv").write_text('image,caption\na.jpg,"one, with comma"\nb.jpg,b one\na.jpg,a two\n')
    (tmp_path / "t.tsv").write_text("file\ttext\nc.png\tc one\nc.png\tc two\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": ["x", "y"]}) + "\n\n"
                                      + json.dumps({"image": str(images / "b.jpg"), "caption": "z"}) + "\n")
    assert read_table(tmp_path / "t.csv") == [("a.jpg", ["one, with comma", "a two"]), ("b.jpg", ["b one"])]
    assert read_table(tmp_path / "t.tsv", "file", "text") == [("c.png", ["c one", "c two"])]
    rows = read_table(tmp_path / "t.jsonl")
    assert rows == [("a.jpg", ["x", "y"]), (str(images / "b.jpg"), ["z"])]
    write_split(table_samples(rows, images, ImageOptions()), tmp_path / "out", "train", progress=False)
    assert list(iter_captions([tmp_path / "out"])) == ["x", "y", "z"]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "caption": "ok"}\n{oops\n')
    with pytest.raises(UserError, match="cannot read JSON .*bad.jsonl line 2"):
        read_table(tmp_path / "bad.jsonl")
    (tmp_path / "empty.csv").write_text("image,caption\na.jpg,\n")
    with pytest.raises(UserError, match="empty.csv:2: column 'caption' must be a non-empty"):
        read_table(tmp_path / "empty.csv")
