"""Streaming loader on real tar shards: batches, seeding, rank/worker split, bad samples, resume, eval."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.decode import DecodeSpec, decode_image, stable_id
from pipeline.errors import UserError
from pipeline.data.eval_split import load_eval_split
from pipeline.data.loader import LoaderConfig, StreamingLoader, image_norm_for
from pipeline.data.tokenizer import SentencePieceTokenizer

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square")
SIZE = 16


def jpeg(seed: int, size: int = SIZE) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def good_sample(k: int, prefix: str = "train") -> dict:
    key = f"{prefix}-{k:08d}"
    caps = [f"a {COLOURS[k % 4]} {SHAPES[k % 2]} left of a blue square", f"the {COLOURS[k % 4]} thing"]
    meta = {"image_id": key, "captions": caps, "width": SIZE, "height": SIZE,
            "objects": [{"box": [0, 0, 8, 8]}, {"box": [8, 4, 16, 16]}],
            "word_objects": [[-1, 0, 0, -1, -1, -1, 1, 1], [-1, 0, -1]]}
    return {"__key__": key, "jpg": jpeg(k), "txt": caps[0], "json": json.dumps(meta).encode()}


def write_split(root: Path, shard_sizes: list[int], make=good_sample, manifest: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    entries, k = [], 0
    for s, n in enumerate(shard_sizes):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(root / name)) as writer:
            for _ in range(n):
                writer.write(make(k))
                k += 1
        entries.append({"url": name, "samples": n, "bytes": (root / name).stat().st_size})
    if manifest:
        (root / "manifest.json").write_text(json.dumps(
            {"format": "relalign-shards/1", "split": "train", "samples": k, "shards": entries,
             "has_regions": False}))
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    caps = [c for k in range(8) for c in json.loads(good_sample(k)["json"])["captions"]]
    return SentencePieceTokenizer.train(caps, tmp_path_factory.mktemp("tok") / "sp.model", 48)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    # uneven shards so workers own different batch counts (exercises the round-robin replay)
    return write_split(tmp_path_factory.mktemp("data") / "train", [6, 9, 3, 6, 12, 6, 3, 9])


def cfg(shards, **kw) -> LoaderConfig:
    base = dict(shards=str(shards), batch_size=3, image_size=SIZE, num_workers=2, shuffle_buffer=8, seed=7,
                max_text_len=24)
    base.update(kw)
    return LoaderConfig(**base)


def ids(loader) -> list[list[int]]:
    return [b["image_id"].tolist() for b in loader]


def test_batch_shapes_and_masks(split, tok):
    loader = StreamingLoader(cfg(split, num_workers=0), tok)
    batch = next(iter(loader))
    B, T = batch["input_ids"].shape
    assert B == 3 and batch["pixels"].shape == (3, 3, SIZE, SIZE) and batch["pixels"].dtype == torch.float32
    assert batch["text_mask"].dtype == torch.bool
    lengths = batch["text_mask"].sum(1)
    for i in range(B):
        n = int(lengths[i])
        assert batch["input_ids"][i, 0] == tok.cls_id and batch["input_ids"][i, n - 1] == tok.sep_id
        assert (batch["input_ids"][i, n:] == 0).all() and (batch["word_index"][i, n:] == -1).all()
    # word_to_region follows the json word_objects of the chosen caption
    wi, wr = batch["word_index"], batch["word_to_region"]
    assert ((wi == -1) <= (wr == -1)).all()
    assert set(wr[wi == 1].tolist()) == {0}                  # "red"/"green"... -> object 0 in both captions
    assert batch["image_id"].dtype == torch.long and batch["text_id"].shape == (3,)
    assert -1.01 <= float(batch["pixels"].min()) and float(batch["pixels"].max()) <= 1.01   # mean/std 0.5
    assert loader.state() == {"epoch": 0, "batches": 1}


def test_same_seed_same_order_epochs_differ(split, tok):
    first = ids(StreamingLoader(cfg(split), tok))
    assert first == ids(StreamingLoader(cfg(split), tok))
    assert first != ids(StreamingLoader(cfg(split), tok, epoch=1))
    assert first != ids(StreamingLoader(cfg(split, seed=8), tok))
    loader = StreamingLoader(cfg(split), tok)
    assert ids(loader) == first and loader.state() == {"epoch": 1, "batches": 0}
    assert ids(loader) == ids(StreamingLoader(cfg(split), tok, epoch=1))   # the epoch advanced by itself


def test_two_ranks_two_workers_disjoint_complete(tmp_path, tok):
    data = write_split(tmp_path / "even", [6] * 8)               # 48 samples = 2 ranks x 2 workers x 4 x 3
    per_rank = [StreamingLoader(cfg(data), tok, rank=r, world_size=2) for r in range(2)]
    assert [loader.batches_per_epoch for loader in per_rank] == [8, 8]
    seen = [i for loader in per_rank for b in ids(loader) for i in b]
    assert len(seen) == 48 and set(seen) == {stable_id(f"train-{k:08d}") for k in range(48)}


def test_ranks_get_equal_batch_counts(split, tok):
    loaders = [StreamingLoader(cfg(split), tok, rank=r, world_size=2) for r in range(2)]
    counts = [len(ids(loader)) for loader in loaders]
    assert counts[0] == counts[1] == loaders[0].batches_in_epoch(0) > 0


@pytest.mark.parametrize("epoch", [0, 1])
def test_resume_continues_exactly(split, tok, epoch):
    for rank in range(2):
        full = ids(StreamingLoader(cfg(split), tok, rank=rank, world_size=2, epoch=epoch))
        assert len(full) >= 7
        for start in (1, 2, 3, 5, len(full) - 1, len(full)):
            resumed = StreamingLoader(cfg(split), tok, rank=rank, world_size=2, epoch=epoch,
                                      start_batch=start)
            assert ids(resumed) == full[start:], (rank, start)


def test_state_after_partial_consumption(split, tok):
    loader = StreamingLoader(cfg(split), tok)
    full = ids(StreamingLoader(cfg(split), tok))
    got = []
    for b in loader:
        got.append(b["image_id"].tolist())
        if len(got) == 3:
            break
    state = loader.state()
    assert state == {"epoch": 0, "batches": 3}
    rebuilt = StreamingLoader(cfg(split), tok, epoch=state["epoch"], start_batch=state["batches"])
    assert got + ids(rebuilt) == full
    assert got + ids(loader) == full          # iterating the same loader again continues too


def test_in_process_matches_round_robin_order(split, tok):
    full = ids(StreamingLoader(cfg(split, num_workers=0), tok))
    for start in (0, 1, 4):
        resumed = StreamingLoader(cfg(split, num_workers=0), tok, start_batch=start)
        assert ids(resumed) == full[start:]


def test_resampled_mode_is_deterministic_and_resumes(split, tok):
    c = cfg(split, resampled=True)
    a = ids(StreamingLoader(c, tok, rank=1, world_size=2))
    assert a == ids(StreamingLoader(c, tok, rank=1, world_size=2))
    assert a != ids(StreamingLoader(c, tok, rank=1, world_size=2, epoch=1))
    assert len(a) == StreamingLoader(c, tok, rank=1, world_size=2).batches_per_epoch
    assert ids(StreamingLoader(c, tok, rank=1, world_size=2, start_batch=3)) == a[3:]


def corrupt_sample(k: int) -> dict:
    sample = good_sample(k)
    kind = k % 8
    if kind == 1:
        sample["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    elif kind == 2:
        sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]   # truncated image data
    elif kind == 3:
        meta = json.loads(sample["json"])
        meta["captions"] = ["   "]
        sample["json"] = json.dumps(meta).encode()
    elif kind == 4:
        del sample["json"]
        sample["txt"] = b"caf\xe9 latin-1"
    elif kind == 5:
        sample["json"] = b"{not json"
    elif kind == 6:
        del sample["json"], sample["txt"]
    elif kind == 7:
        sample["pyd"] = b"cos\nsystem\n(S'echo pwned'\ntR."              # never unpickled, never read
    return sample


def test_bad_samples_skipped_and_counted(tmp_path, tok):
    data = write_split(tmp_path / "bad", [8, 8, 8], make=corrupt_sample)
    loader = StreamingLoader(cfg(data, batch_size=2, num_workers=2), tok)
    seen = [i for b in ids(loader) for i in b]
    good = {stable_id(f"train-{k:08d}") for k in range(24) if k % 8 in (0, 7)}
    assert set(seen) == good and len(seen) == 2 * loader.batches_per_epoch   # short windows are topped up
    reasons = {"bad_image": 6, "empty_caption": 3, "bad_caption_encoding": 3, "bad_json": 3,
               "missing_caption": 3}
    assert set(loader.skipped) == set(reasons)
    assert all(loader.skipped[r] >= n for r, n in reasons.items())   # read-ahead may meet a bad sample twice
    assert ids(StreamingLoader(cfg(data, batch_size=2), tok, start_batch=5)) == ids(
        StreamingLoader(cfg(data, batch_size=2), tok))[5:]


def test_truncated_tar_stops_that_shard_only(tmp_path, tok):
    data = write_split(tmp_path / "trunc", [6, 6, 6, 6])
    tar = data / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])
    loader = StreamingLoader(cfg(data, batch_size=3), tok)
    batches = ids(loader)
    assert len(batches) == loader.batches_per_epoch == 8     # the worker's stream wraps to fill its count
    seen = {i for b in batches for i in b}
    assert {stable_id(f"train-{k:08d}") for k in (0, 12, 18)} <= seen
    assert loader.skipped.get("truncated_tar") == 1
    again = StreamingLoader(cfg(data, batch_size=3), tok, start_batch=5)
    assert ids(again) == batches[5:]


def npz_bytes(n: int, d: int, wh=(SIZE, SIZE), boxes=None) -> bytes:
    buf = io.BytesIO()
    boxes = np.tile([[1.0, 2.0, 9.0, 14.0]], (n, 1)) if boxes is None else boxes
    np.savez(buf, features=np.ones((n, d), np.float32), boxes=np.asarray(boxes, np.float32),
             image_size=np.array(wh))
    return buf.getvalue()


def feature_sample(k: int) -> dict:
    sample = good_sample(k)
    sample["npz"] = {0: npz_bytes(2, 5), 1: npz_bytes(3, 5), 2: npz_bytes(2, 7),
                     3: b"garbage", 4: npz_bytes(3, 5, boxes=np.zeros((2, 4)))}[k % 5]
    return sample


def test_features_mode_and_bad_npz(tmp_path, tok):
    data = write_split(tmp_path / "feat", [10], make=feature_sample)
    loader = StreamingLoader(cfg(data, batch_size=2, num_workers=0, image_mode="features", feat_dim=5), tok)
    batches = list(loader)
    assert loader.skipped == {"bad_npz": 6}
    for b in batches:
        assert "pixels" not in b and b["region_feat"].shape[-1] == 5
        m = b["region_mask"]
        assert b["region_feat"].shape[:2] == m.shape == b["region_pos"].shape[:2]
        assert (b["region_feat"][~m] == 0).all() and (b["region_feat"][m] == 1).all()
        pos = b["region_pos"][m][0].tolist()
        assert pos == pytest.approx([1 / 16, 2 / 16, 9 / 16, 14 / 16, 0.5, 0.75, 0.375])


def test_roi_mode_boxes_scaled_to_resized_image(split, tok):
    loader = StreamingLoader(cfg(split, num_workers=0, image_mode="roi", image_size=32), tok)
    b = next(iter(loader))
    assert b["pixels"].shape[-1] == 32
    assert b["boxes"].shape == (3, 2, 4) and b["region_mask"].all()
    assert b["boxes"][0].tolist() == [[0, 0, 16, 16], [16, 8, 32, 32]]
    assert b["region_pos"][0, 1].tolist() == pytest.approx([0.5, 0.25, 1, 1, 0.5, 0.75, 0.375])


def img2dataset_sample(k: int) -> dict:
    meta = {"url": f"http://example.com/{k}.jpg", "caption": f"a photo number {k}", "key": f"{k:09d}",
            "status": "success", "error_message": None, "width": SIZE, "height": SIZE,
            "original_width": 64, "original_height": 64, "exif": "{}"}
    return {"__key__": f"{k:09d}", "jpg": jpeg(k), "txt": meta["caption"], "json": json.dumps(meta).encode()}


def test_img2dataset_layout_without_manifest(tmp_path, tok):
    data = write_split(tmp_path / "i2d", [4, 4], make=img2dataset_sample, manifest=False)
    for spec in (data, data / "{00000..00001}.tar"):
        loader = StreamingLoader(cfg(spec, batch_size=2), tok)
        seen = sorted(i for b in ids(loader) for i in b)
        assert seen == sorted(stable_id(f"{k:09d}") for k in range(8)) and not loader.skipped
    ev = load_eval_split(str(data), tok, cfg(data))
    assert ev.captions[3] == "a photo number 3" and ev.n_images == 8


def test_eval_split_holds_everything(split, tok, tmp_path):
    data = write_split(tmp_path / "test", [5, 4])
    quads = [{"image0": "train-00000000", "caption0": "a red circle left of a blue square",
              "image1": "train-00000004", "caption1": "the red thing"},
             {"image0": "train-00000000", "caption0": "a caption the split does not hold",
              "image1": "train-00000004", "caption1": "the red thing"}]
    (data / "quadruples.json").write_text(json.dumps(quads))
    ev = load_eval_split(str(data), tok, cfg(data))
    assert ev.image_keys == [f"train-{k:08d}" for k in range(9)] and ev.n_texts == 18
    assert ev.images["pixels"].shape == (9, 3, SIZE, SIZE)
    assert ev.text_to_image.tolist() == [k // 2 for k in range(18)]
    assert [len(t) for t in ev.token_objects] == [len(ids) for ids in ev.caption_ids]
    assert ev.quadruples == [(0, 0, 4, 9)] and not ev.skipped
    texts = ev.text_inputs(torch.tensor([0, 9]))
    assert texts["input_ids"].shape[0] == 2 and texts["text_mask"].sum(1).tolist() == \
        [len(ev.caption_ids[0]), len(ev.caption_ids[9])]
    part = ev.subset(max_images=4, captions_per_image=1)
    assert part.image_keys == ev.image_keys[:4] and part.text_to_image.tolist() == [0, 1, 2, 3]
    assert part.captions == [ev.captions[c] for c in (0, 2, 4, 6)] and part.images["pixels"].shape[0] == 4
    assert part.quadruples == [] and ev.subset() is ev


def test_timm_normalisation_and_draft_decoding():
    mean, std, interp = image_norm_for("resnet50")
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and interp in ("bilinear", "bicubic")
    with pytest.raises(UserError):
        image_norm_for("no_such_model_xyz")
    # a smooth large JPEG decoded in draft mode matches the full decode closely
    yy, xx = np.mgrid[0:256, 0:256]
    img = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    spec = DecodeSpec(32, mean, std, 16, "patch", 4)
    small, stored = decode_image(buf.getvalue(), spec)
    full = np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC))
    assert stored == (256, 256) and small.shape == (32, 32, 3)
    assert np.abs(small.astype(int) - full.astype(int)).mean() < 3


def test_config_errors(split, tok):
    with pytest.raises(UserError, match="image_mode"):
        cfg(split, image_mode="pixels")
    with pytest.raises(UserError, match="no full batch"):
        StreamingLoader(cfg(split, batch_size=1000), tok)
    with pytest.raises(UserError):
        StreamingLoader(cfg(split.parent / "nope" / "{0..1}.tar"), tok)


def test_resume_after_a_worker_ran_dry(tmp_path, tok):
    data = write_split(tmp_path / "lopsided", [3, 30])        # one rank: workers own 1 and 10 batches
    full = ids(StreamingLoader(cfg(data, shuffle=False), tok))
    assert len(full) == 11
    for start in (1, 2, 3, 6):
        assert ids(StreamingLoader(cfg(data, shuffle=False), tok, start_batch=start)) == full[start:]


def test_batches_name_their_samples_by_tar_key(split, tok):
    batch = next(iter(StreamingLoader(cfg(split, batch_size=4), tok)))
    assert [stable_id(k) for k in batch["keys"]] == batch["image_id"].tolist()


def test_a_shard_deleted_mid_epoch_is_counted_and_the_epoch_ends(tmp_path, tok):
    data = write_split(tmp_path / "vanish", [6, 6, 6, 6])
    loader = StreamingLoader(cfg(data, batch_size=3, num_workers=0), tok)
    batches = iter(loader)
    first = next(batches)
    # the shuffle buffer (8) may already hold an open second shard: delete two the first batch did not touch
    touched = {int(key.rsplit("-", 1)[1]) // 6 for key in first["keys"]}
    for shard in [s for s in range(4) if s not in touched][:2]:
        (data / f"{shard:05d}.tar").unlink()
    rest = list(batches)
    assert len(rest) + 1 == loader.batches_per_epoch   # the stream wraps to fill its count: no hang, no crash
    assert loader.skipped.get("unreadable_shard", 0) >= 1


KILLED_WORKER = r"""
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_loader import cfg
from pipeline.data.loader import StreamingLoader
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import JobFault


def children():
    found = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            found |= {int(p) for p in (task / "children").read_text().split()}
        except FileNotFoundError:   # a thread that ended meanwhile
            pass
    return found


before = children()
batches = iter(StreamingLoader(cfg(sys.argv[1], batch_size=2, num_workers=2), load_tokenizer(sys.argv[2])))
next(batches)
os.kill(min(children() - before), signal.SIGKILL)
start = time.monotonic()
try:
    for _ in range(10_000):
        next(batches)
    print("no error", flush=True)
except JobFault as exc:
    print(f"after {time.monotonic() - start:.1f} s: {exc}", flush=True)
    # workers still registered when the fault reaches the caller let torch's SIGCHLD handler raise the death
    # again, over the fault, wherever the caller is then (as it did in CI's error report)
    print(f"workers left: {sorted(children() - before)}", flush=True)
os._exit(0)   # what the loader's threads do at interpreter exit after the kill is not this test's question
"""


def test_a_killed_data_worker_is_an_error_within_seconds_not_a_hang(split, tok):
    """In its own process: torch's SIGCHLD handler raises the worker's death in whatever the main thread runs
    next, which under pytest-xdist may be the worker's own plumbing."""
    proc = subprocess.run([sys.executable, "-c", KILLED_WORKER, str(split), str(tok.path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # torch's RuntimeError naming the worker, or (killed while it handed over a batch) the broken connection
    match = re.search(r"after ([0-9.]+) s: rank 0: a data-loader worker of shards .* died \((DataLoader worker|"
                      r"EOFError|.*Connection)", proc.stdout)
    assert match and float(match.group(1)) < 30, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "workers left: []" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def nan_box_sample(k: int) -> dict:
    sample = good_sample(k)
    if k % 2:
        meta = json.loads(sample["json"])
        meta["objects"][0]["box"] = [float("nan"), 0, 8, 8]   # json writes NaN, Python's json reads it back
        sample["json"] = json.dumps(meta).encode()
    return sample


@pytest.mark.parametrize("image_mode", ["patch", "roi"])
def test_a_non_finite_object_box_is_a_counted_bad_sample(tmp_path, tok, image_mode):
    """Its NaN centre made the grounding loss NaN: with train.nonfinite=stop one bad annotation ended the run."""
    from pipeline.data.eval_split import load_eval_split
    data = write_split(tmp_path / "nan", [6], make=nan_box_sample)
    c = cfg(data, batch_size=2, num_workers=0, image_mode=image_mode)
    loader = StreamingLoader(c, tok)
    batches = list(loader)
    assert loader.skipped == {"bad_json": 3}
    assert all(torch.isfinite(b["word_centre"]).all() for b in batches if "word_centre" in b)
    evaluated = load_eval_split(str(data), tok, c)
    assert len(evaluated.image_keys) == 3 and evaluated.skipped == {"bad_json": 3}
