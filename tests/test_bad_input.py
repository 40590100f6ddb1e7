"""Bad input ends at start-up with one line `error: ...` on stderr and exit code 2, never a traceback.

One table per entry point: launch/finetune.py (via pipeline.cli.main with --print-config, which runs every
start-up check and no training), launch/make_shards.py and launch/evaluate.py.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import cli
from pipeline.data.shards import Sample, write_split

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "launch" / "configs" / "demo_tiny.yaml"
ZERO2 = REPO / "ds_configs" / "zero2.json"


def load_launcher(name: str):
    """A launch/ script as a module (launch/evaluate.py would clash with an installed `evaluate` package)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_shards = load_launcher("make_shards")
evaluate_cli = load_launcher("evaluate")


def assert_one_error(code: int, stderr: str, *names: str) -> None:
    """Exit 2, exactly one `error:` line (the last one) naming every one of ``names``, no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    for name in names:
        assert name in errors[0], (name, errors[0])


def jpeg_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


# ----------------------------------------------------------------------------- launch/finetune.py

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad YAML / DeepSpeed JSON files and shard splits with one and with zero samples, by file name."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "malformed.yaml").write_text("train: [steps: 1\n")
    (root / "key_twice.yaml").write_text("data: {synthetic: {}}\ntrain: {steps: 5}\nseed: 1\ntrain: {lr: 0.001}\n")
    (root / "latin1.json").write_bytes('{"note": "caf\xe9"}'.encode("latin-1"))
    (root / "notjson.json").write_text("{not json")
    zero2 = json.loads(ZERO2.read_text())
    variants = {
        "bf16_true": lambda d: d.update(bf16=True),
        "params_null": lambda d: d["optimizer"].update(params=None),
        "lr_string": lambda d: d["optimizer"]["params"].update(lr="fast"),
        "lr_negative": lambda d: d["optimizer"]["params"].update(lr=-0.1),
        "zero7": lambda d: d["zero_optimization"].update(stage=7),
        "zero_null": lambda d: d.update(zero_optimization=None),
        "sched_params_null": lambda d: d["scheduler"].update(params=None),
        "warmup_string": lambda d: d["scheduler"]["params"].update(warmup_num_steps="ten"),
        "bf16_yes": lambda d: d.update(bf16={"enabled": "yes"}),
    }
    for name, change in variants.items():
        ds = json.loads(json.dumps(zero2))
        change(ds)
        (root / f"{name}.json").write_text(json.dumps(ds))
    one = Sample(key="a", image=jpeg_bytes(), image_ext="jpg", meta={"captions": ["a red square"]})
    write_split([one], root / "one", "train", progress=False)
    write_split([], root / "empty", "val", progress=False)
    write_shard_variants(root)
    write_feature_splits(root)
    (root / "taken").write_text("a file, not a directory\n")
    (root / "latest_only").mkdir()
    (root / "latest_only" / "latest").write_text("step9\n")
    named = {p.name: p for p in root.iterdir()}
    named["under_file"] = root / "taken" / "run"
    named["brace_none"] = root / "three" / "{00005..00006}.tar"
    return named


def write_shard_variants(root: Path) -> None:
    """Splits of 3 samples in shards of 2 + 1 whose tars and manifest disagree (by directory name)."""
    three = [Sample(key=f"k{i}", image=jpeg_bytes(), image_ext="jpg", meta={"captions": ["a red square"]})
             for i in range(3)]
    write_split(three, root / "three", "train", max_samples=2, progress=False)
    for name in ("counts_high", "counts_low", "missing_shard", "truncated", "zero_byte", "zero_byte_no_manifest"):
        shutil.copytree(root / "three", root / name)
    edit_manifest(root / "counts_high", lambda shards: shards[0].update(samples=6))
    edit_manifest(root / "counts_low", lambda shards: shards[0].update(samples=1))
    (root / "missing_shard" / "00001.tar").unlink()
    tar = root / "truncated" / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    (root / "zero_byte" / "00001.tar").write_bytes(b"")
    (root / "zero_byte_no_manifest" / "00001.tar").write_bytes(b"")
    (root / "zero_byte_no_manifest" / "manifest.json").unlink()
    (root / "zero.tar").write_bytes(b"")


def region_npz(width: int) -> bytes:
    out = io.BytesIO()
    np.savez(out, features=np.ones((2, width), np.float32), boxes=np.array([[0, 0, 8, 8], [8, 8, 16, 16]], np.float32),
             image_size=np.array([16, 16]))
    return out.getvalue()


def write_feature_splits(root: Path) -> None:
    """feat8: images with 8-d region features; npz_only: region features and captions, no image member."""
    with_features = [Sample(key=f"f{i}", image=jpeg_bytes(), image_ext="jpg", meta={"captions": ["a red square"]},
                            npz=region_npz(8)) for i in range(2)]
    write_split(with_features, root / "feat8", "train", progress=False)
    (root / "npz_only").mkdir()
    tar_of(root / "npz_only" / "00000.tar", [(f"n{i}.{ext}", data) for i in range(2) for ext, data in
                                             (("npz", region_npz(8)), ("txt", b"a red square"))])


def edit_manifest(split: Path, change) -> None:
    """``change`` the manifest's shard entries in place; the total is kept consistent."""
    manifest = json.loads((split / "manifest.json").read_text())
    change(manifest["shards"])
    manifest["samples"] = sum(s["samples"] for s in manifest["shards"])
    (split / "manifest.json").write_text(json.dumps(manifest))


def finetune_cli(capsys, tmp_path, *args: str) -> tuple[int, str]:
    """pipeline.cli.main for launch/finetune.py on the demo config, a fresh run_dir, no resume."""
    argv = ["--config", str(DEMO), "--print-config", "--set", f"run_dir={tmp_path / 'run'}",
            "--set", "checkpoint.resume=false", *args]
    code = cli.main("finetune", argv)
    return code, capsys.readouterr().err


def sets(*assignments: str) -> list[str]:
    return [x for a in assignments for x in ("--set", a)]


def ds(name: str) -> list[str]:
    return ["--deepspeed_config", f"@{name}.json"]


def real_split(train: str) -> list[str]:
    """Real shards for every split, ``train`` (a fixture name) for the training one."""
    return sets("data.synthetic=null", f"data.train={train}", "data.val=@one", "data.test=@one")


# (row id, arguments (@name: a file of the `files` fixture), what the error line names)
FINETUNE_ROWS = [
    # values that passed validation and crashed later (some mid-training)
    ("log_every_0", sets("train.log_every=0"), ["train.log_every", "0"]),
    ("lr_negative", sets("train.lr=-1e-4"), ["train.lr", "-0.0001"]),
    ("threads_negative", sets("train.threads=-1"), ["train.threads", "-1"]),
    ("iais_layer_99", sets("finetune.iais.layers=[99]"), ["finetune.iais.layers", "99"]),
    ("isd_layer_99", sets("eval.isd_layer=99"), ["eval.isd_layer", "99"]),
    ("checkpoint_every_negative", sets("checkpoint.every=-1"), ["checkpoint.every", "-1"]),
    ("margin_negative", sets("finetune.margin=-0.5"), ["finetune.margin", "-0.5"]),
    ("iais_weight_negative", sets("finetune.iais.weight=-1"), ["finetune.iais.weight", "-1"]),
    ("bce_weight_negative", sets("finetune.bce_weight=-1"), ["finetune.bce_weight"]),
    ("hard_start_negative", sets("finetune.hard_start_step=-5"), ["finetune.hard_start_step"]),
    ("vocab_size_0", sets("data.vocab_size=0"), ["data.vocab_size", "0"]),
    ("val_max_images_negative", sets("eval.val_max_images=-1"), ["eval.val_max_images"]),
    ("val_captions_negative", sets("eval.val_captions_per_image=-2"), ["eval.val_captions_per_image"]),
    # config file and values
    ("yaml_not_utf8", ["--config", "@latin1.yaml"], ["latin1.yaml", "UTF-8"]),
    ("yaml_malformed", ["--config", "@malformed.yaml"], ["malformed.yaml", "YAML"]),
    ("unknown_key", sets("train.stepz=3"), ["train.stepz"]),
    ("wrong_type", sets("train.steps=abc"), ["train.steps", "abc"]),
    ("negative_image_size", sets("data.image_size=-4"), ["data.image_size", "-4"]),
    ("negative_micro_batch", sets("train.micro_batch_size=-2"), ["train.micro_batch_size", "-2"]),
    ("negative_score_batch", sets("eval.score_batch=-1"), ["eval.score_batch", "-1"]),
    ("negative_synthetic_count", sets("data.synthetic.train=-5"), ["train", "-5"]),
    # DeepSpeed JSON
    ("ds_not_utf8", ds("latin1"), ["latin1.json", "UTF-8"]),
    ("ds_not_json", ds("notjson"), ["notjson.json", "JSON"]),
    ("ds_bf16_true", ds("bf16_true"), ["bf16_true.json", "bf16", "object"]),
    ("ds_bf16_enabled_yes", ds("bf16_yes"), ["bf16.enabled", "yes"]),
    ("ds_params_null", ds("params_null"), ["params_null.json", "optimizer.params", "null"]),
    ("ds_lr_string", ds("lr_string") + sets("train.lr=auto"), ["optimizer.params.lr", "fast"]),
    ("ds_lr_negative", ds("lr_negative") + sets("train.lr=auto"), ["optimizer.params.lr", "-0.1"]),
    ("ds_zero_stage_7", ds("zero7"), ["zero7.json", "zero_optimization.stage", "7"]),
    ("ds_zero_null", ds("zero_null"), ["zero_optimization", "null"]),
    ("ds_scheduler_params_null", ds("sched_params_null"), ["scheduler.params", "null"]),
    ("ds_warmup_string", ds("warmup_string") + sets("train.warmup_steps=auto"), ["warmup_num_steps", "ten"]),
    # empty splits: the synthetic counts, and manifests that list 0 samples
    ("synthetic_val_0", sets("data.synthetic.val=0"), ["data.synthetic.val", "0", "empty"]),
    ("synthetic_test_0", sets("data.synthetic.test=0"), ["data.synthetic.test", "eval.test"]),
    ("empty_train_split", sets("data.synthetic=null", "data.train=@empty", "data.val=@one", "data.test=@one"),
     ["data.train", "train split is empty", "manifest.json"]),
    ("empty_val_split", sets("data.synthetic=null", "data.train=@one", "data.val=@empty", "data.test=@one"),
     ["data.val", "val split is empty", "manifest.json"]),
    ("empty_test_split", sets("data.synthetic=null", "data.train=@one", "data.val=@one", "data.test=@empty"),
     ["data.test", "test split is empty", "manifest.json"]),
    # tars that disagree with their manifest (they trained on repeated or a third of the data, or only counted)
    ("manifest_counts_too_high", real_split("@counts_high"), ["data.train", "00000.tar", "holds 2", "lists 6"]),
    ("manifest_counts_too_low", real_split("@counts_low"), ["data.train", "00000.tar", "holds 2", "lists 1"]),
    ("listed_shard_missing", real_split("@missing_shard"), ["data.train", "00001.tar", "manifest.json", "missing"]),
    ("truncated_tar_with_manifest", real_split("@truncated"), ["00000.tar", "holds 1", "lists 2", "bytes"]),
    # a 0-byte tar (was: a batch-size or tokenizer problem, or silently fewer samples)
    ("zero_byte_tar_in_manifest", real_split("@zero_byte"), ["data.train", "00001.tar", "0 bytes"]),
    ("zero_byte_tar_no_manifest", real_split("@zero_byte_no_manifest"), ["00001.tar", "0 bytes"]),
    ("zero_byte_tar_alone", real_split("@zero.tar"), ["data.train", "zero.tar", "0 bytes"]),
    ("zero_byte_tar_tokenizer_from_shards", real_split("@zero.tar") + sets("data.tokenizer=null"),
     ["zero.tar", "0 bytes"]),
    ("brace_pattern_matches_nothing", real_split("@brace_none"), ["data.train", "00005.tar", "2 missing"]),
    # run_dir that cannot be written (was: a traceback from mkdir after the process group started)
    ("run_dir_under_a_file", sets("run_dir=@under_file"), ["run_dir", "taken", "is a file"]),
    ("run_dir_is_a_file", sets("run_dir=@taken"), ["run_dir", "taken", "is a file"]),
    # checkpoints that are not checkpoints
    ("resume_dir_not_a_checkpoint", sets("checkpoint.resume=@one"), ["checkpoint.resume", "no complete checkpoint"]),
    ("init_dir_not_a_checkpoint", sets("model.pretrain_config=null", "model.init=@one"),
     ["model.init", "one", "save_pretrained", "latest"]),
    ("init_latest_names_missing_tag", sets("model.pretrain_config=null", "model.init=@latest_only"),
     ["model.init", "step9", "does not exist"]),
    ("init_file_not_a_checkpoint", sets("model.pretrain_config=null", "model.init=@taken"),
     ["model.init", "taken", ".pt"]),
    # found by a second probe: a traceback mid-training, or accepted and then wrong
    ("iais_layers_empty", sets("finetune.iais.layers=[]"), ["finetune.iais.layers", "names no layer"]),
    ("seed_beyond_numpy", sets("seed=99999999999"), ["seed", "99999999999", "0..4294967295"]),
    ("seed_negative", sets("seed=-1"), ["seed", "-1"]),
    ("tracking_uri_unknown_scheme", sets("tracking.enabled=true", "tracking.tracking_uri=ftp://host/mlruns"),
     ["tracking.tracking_uri", "ftp://host/mlruns", "no tracking store", "'ftp'", "http"]),
    ("yaml_key_twice", ["--config", "@key_twice.yaml"], ["key_twice.yaml", "'train' appears twice", "lines 2 and 4"]),
    ("set_value_key_twice", sets("model.overrides={dropout: 0.1, dropout: 0.2}"),
     ["model.overrides", "'dropout' appears twice"]),
    ("config_is_a_directory", ["--config", "@empty"], ["config file", "is a directory"]),
    ("relations_split_not_a_tar", real_split("@one") + sets("data.relations=@key_twice.yaml"),
     ["data.relations", "key_twice.yaml", "not a tar file"]),
    # training shards that cannot feed the model: refused at start-up, not after every sample was skipped
    ("features_mode_on_image_shards", real_split("@one") + sets("data.image_mode=features",
                                                                "model.overrides={image: {feat_dim: 8}}"),
     ["data.train", "no .npz region features", "data.image_mode is features"]),
    ("region_features_of_another_width", real_split("@feat8") + sets("data.image_mode=features",
                                                                     "model.overrides={image: {feat_dim: 5}}"),
     ["data.train", "8-d region features", "model.image.feat_dim is 5"]),
    ("patch_mode_on_feature_only_shards", real_split("@npz_only"),
     ["data.train", "no image", "data.image_mode is patch", "data.image_mode=features"]),
]


def with_files(args: list[str], files: dict[str, Path]) -> list[str]:
    """``@name`` in ``args`` replaced by the path of the fixture file ``name``."""
    def path_of(arg: str) -> str:
        head, at, name = arg.partition("@")
        return head + str(files[name]) if at else arg
    return [path_of(a) for a in args]


@pytest.mark.parametrize("args,names", [row[1:] for row in FINETUNE_ROWS], ids=[row[0] for row in FINETUNE_ROWS])
def test_finetune_bad_input_is_one_error_line(args, names, files, capsys, tmp_path):
    code, err = finetune_cli(capsys, tmp_path, *with_files(args, files))
    assert_one_error(code, err, *names)


def test_a_pretraining_source_without_shards_is_one_error_line(capsys, tmp_path):
    """It read as "config 'pretrain.sources[0].shards' = : the directory holds no manifest.json ..."."""
    code = cli.main("pretrain", ["--print-config", "--set", f"run_dir={tmp_path / 'run'}",
                                 "--set", "pretrain.sources=[{weight: 1}]"])
    assert_one_error(code, capsys.readouterr().err, "pretrain.sources[0].shards", "is not set")


def test_empty_test_split_is_not_checked_without_test_evaluation(files, capsys, tmp_path):
    args = sets("data.synthetic=null", "data.train=@one", "data.val=@one", "data.test=@empty", "eval.test=false")
    code, err = finetune_cli(capsys, tmp_path, *with_files(args, files))
    assert code == 0, err


def test_zero_warmup_steps_works(capsys, tmp_path):
    """train.warmup_steps=0 is valid: DeepSpeed's schedulers, which reject 0 warmup steps, get their shortest."""
    import torch
    from deepspeed.runtime import lr_schedules
    from pipeline.config import load_config, read_ds_config, resolve_ds_config
    code, err = finetune_cli(capsys, tmp_path, *sets("train.warmup_steps=0"))
    assert code == 0, err
    for schedule in ("cosine", "linear"):
        cfg = load_config(DEMO, ["train.warmup_steps=0", f"train.lr_schedule={schedule}"])
        resolved = resolve_ds_config(read_ds_config(ZERO2), cfg, world_size=1, accelerator="cpu")
        assert cfg.train.warmup_steps == 0
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
        scheduler = getattr(lr_schedules, resolved["scheduler"]["type"])(optimizer, **resolved["scheduler"]["params"])
        scheduler.step()


def test_finetune_script_prints_no_traceback(files, tmp_path):
    """The real entry point, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "launch/finetune.py", "--print-config", "--deepspeed_config", str(files["bf16_true.json"]),
         "--set", f"run_dir={tmp_path / 'run'}", "--set", "checkpoint.resume=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_one_error(result.returncode, result.stderr, "bf16")


# ----------------------------------------------------------------------------- launch/make_shards.py

@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(jpeg_bytes())
    return folder


def karpathy_json(tmp_path: Path, splits: list[str]) -> Path:
    entries = [{"filename": name, "split": split, "sentences": [{"raw": f"{name} left of a circle"}]}
               for name, split in zip(("a.jpg", "b.jpg"), splits)]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def csv_table(tmp_path: Path, body: str, name: str = "pairs.csv") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "taken"
    path.write_text("not a directory\n")
    return path


def features_dir(tmp_path: Path, features, boxes) -> Path:
    """A --features folder with a.npz of the given arrays (image_size 16 x 16)."""
    folder = tmp_path / "features"
    folder.mkdir()
    np.savez(folder / "a.npz", features=features, boxes=boxes, image_size=np.array([16, 16]))
    return folder


UNQUOTED_COMMA = "image,caption\na.jpg,a square\nb.jpg,a box, left of a circle\n"

# (row id, arguments built from (tmp_path, images), what the error line names)
MAKE_SHARDS_ROWS = [
    ("csv_unquoted_comma",
     lambda t, i: ["table", "--input", str(csv_table(t, UNQUOTED_COMMA)), "--images", str(i), "--out", str(t / "o")],
     ["pairs.csv:3", "3 fields", "header has 2", "quote"]),
    ("tsv_extra_tab",
     lambda t, i: ["table", "--input", str(csv_table(t, "image\tcaption\na.jpg\ta\tsquare\n", "pairs.tsv")),
                   "--images", str(i), "--out", str(t / "o")],
     ["pairs.tsv:2", "tab"]),
    ("karpathy_empty_val",
     lambda t, i: ["karpathy", "--json", str(karpathy_json(t, ["train", "test"])), "--images", str(i),
                   "--out", str(t / "o"), "--quiet"],
     ["val=val", "dataset_flickr30k.json", "empty"]),
    ("karpathy_limit_0",
     lambda t, i: ["karpathy", "--json", str(karpathy_json(t, ["train", "val"])), "--images", str(i),
                   "--out", str(t / "o"), "--split", "train=train", "--limit", "0", "--quiet"],
     ["--limit", "0"]),
    ("table_out_is_file",
     lambda t, i: ["table", "--input", str(csv_table(t, "image,caption\na.jpg,a square\n")), "--images", str(i),
                   "--out", str(a_file(t))],
     ["--out", "taken", "not a directory"]),
    ("karpathy_out_is_file",
     lambda t, i: ["karpathy", "--json", str(karpathy_json(t, ["train", "val"])), "--images", str(i),
                   "--out", str(a_file(t)), "--split", "train=train", "--quiet"],
     ["--out", "taken"]),
    ("synthetic_out_under_file",
     lambda t, i: ["synthetic", "--out", str(a_file(t) / "data"), "--quiet"],
     ["--out", "taken", "is a file"]),
    # region features of the wrong shape
    ("features_boxes_wrong_shape",
     lambda t, i: ["table", "--input", str(csv_table(t, "image,caption\na.jpg,a square\n")), "--images", str(i),
                   "--features", str(features_dir(t, np.zeros((2, 8)), np.zeros((3, 4)))), "--out", str(t / "o")],
     ["a.npz", "'boxes' must be [2, 4]", "(3, 4)"]),
    ("features_not_2d",
     lambda t, i: ["table", "--input", str(csv_table(t, "image,caption\na.jpg,a square\n")), "--images", str(i),
                   "--features", str(features_dir(t, np.zeros(8), np.zeros((1, 4)))), "--out", str(t / "o")],
     ["a.npz", "'features' must be a numeric [n, d] array"]),
    # malformed Karpathy JSON and JSONL tables
    ("karpathy_not_json",
     lambda t, i: ["karpathy", "--json", str(csv_table(t, '{"images": [', "dataset_coco.json")), "--images", str(i),
                   "--out", str(t / "o"), "--quiet"],
     ["dataset_coco.json", "JSON"]),
    ("karpathy_no_images_list",
     lambda t, i: ["karpathy", "--json", str(csv_table(t, '{"imgs": []}', "dataset_coco.json")), "--images", str(i),
                   "--out", str(t / "o"), "--quiet"],
     ["dataset_coco.json", "'images' list"]),
    ("karpathy_sentences_not_a_list",
     lambda t, i: ["karpathy", "--json", str(csv_table(t, json.dumps({"images": [
         {"filename": "a.jpg", "split": "train", "sentences": "a square"}]}), "dataset_coco.json")),
         "--images", str(i), "--out", str(t / "o"), "--quiet"],
     ["images[0]", "a.jpg", "sentences"]),
    ("karpathy_unknown_split",
     lambda t, i: ["karpathy", "--json", str(karpathy_json(t, ["train", "dev"])), "--images", str(i),
                   "--out", str(t / "o"), "--quiet"],
     ["images[1]", "'dev'"]),
    ("karpathy_duplicate_filename",
     lambda t, i: ["karpathy", "--json", str(csv_table(t, json.dumps({"images": [
         {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a square"}]}] * 2}), "dataset_coco.json")),
         "--images", str(i), "--out", str(t / "o"), "--split", "train=train", "--quiet"],
     ["duplicate", "a"]),
    ("jsonl_broken_line",
     lambda t, i: ["table", "--input", str(csv_table(t, '{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg"',
                                                     "pairs.jsonl")), "--images", str(i), "--out", str(t / "o")],
     ["pairs.jsonl", "line 2"]),
    ("jsonl_line_not_an_object",
     lambda t, i: ["table", "--input", str(csv_table(t, '["a.jpg", "x"]\n', "pairs.jsonl")), "--images", str(i),
                   "--out", str(t / "o")],
     ["pairs.jsonl:1", "JSON object"]),
    ("jsonl_caption_not_a_string",
     lambda t, i: ["table", "--input", str(csv_table(t, '{"image": "a.jpg", "caption": 7}\n', "pairs.jsonl")),
                   "--images", str(i), "--out", str(t / "o")],
     ["pairs.jsonl:1", "caption"]),
    # found by a second probe: a traceback, and PIL's object repr as the reason
    ("out_where_nothing_can_be_written",
     lambda t, i: ["table", "--input", str(csv_table(t, "image,caption\na.jpg,x\n", "pairs.csv")), "--images", str(i),
                   "--out", "/proc/relalign_out"],
     ["--out", "/proc/relalign_out", "cannot write in /proc"]),
    ("image_not_an_image",
     lambda t, i: ["table", "--input", str(csv_table(t, "image,caption\npairs.csv,x\n", "pairs.csv")), "--images",
                   str(t), "--out", str(t / "o")],
     ["pairs.csv", "not an image file PIL can read"]),
]


def test_make_shards_reads_a_csv_with_a_byte_order_mark(images, tmp_path, capsys):
    """Spreadsheets export UTF-8 CSV with a BOM; its header's first column was '\ufeffimage' (no column 'image')."""
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\na.jpg,a red square\n", encoding="utf-8-sig")
    code = make_shards.main(["table", "--input", str(table), "--images", str(images), "--out", str(tmp_path / "o"),
                             "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["samples"] == 1


@pytest.mark.parametrize("make_args,names", [row[1:] for row in MAKE_SHARDS_ROWS],
                         ids=[row[0] for row in MAKE_SHARDS_ROWS])
def test_make_shards_bad_input_is_one_error_line(make_args, names, images, tmp_path, capsys):
    code = make_shards.main(make_args(tmp_path, images))
    assert_one_error(code, capsys.readouterr().err, *names)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("manifest.json"))


# ----------------------------------------------------------------------------- launch/evaluate.py

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from models import create_model
    model_dir = tmp_path_factory.mktemp("model") / "model"
    create_model("tiny", vocab_size=50, max_text_len=16,
                 image=dict(mode="patch", backbone="test_vit", image_size=64)).save_pretrained(model_dir)
    return model_dir


# (row id, arguments built from (tmp_path, model dir), what the error line names). --shards is missing in every
# row: the error must come before the split (or the demo's data) is touched.
EVALUATE_ROWS = [
    ("out_is_file", lambda t, m: ["--model", str(t / "no_model"), "--out", str(a_file(t))],
     ["--out", "taken", "not a directory"]),
    ("out_under_file", lambda t, m: ["--model", str(t / "no_model"), "--out", str(a_file(t) / "results")],
     ["--out", "is a file"]),
    ("isd_layer_99", lambda t, m: ["--model", str(m), "--out", str(t / "out"), "--isd-layer", "99",
                                   "--shards", str(t / "no_split")],
     ["--isd-layer 99", "-3..2"]),
    # directories that are not a model or checkpoint
    ("model_dir_not_a_checkpoint", lambda t, m: ["--model", str(not_a_checkpoint(t)), "--out", str(t / "out"),
                                                 "--shards", str(t / "no_split")],
     ["--model", "not_a_checkpoint", "save_pretrained", "latest"]),
    ("model_latest_names_missing_tag", lambda t, m: ["--model", str(latest_without_tag(t, m)), "--out",
                                                     str(t / "out"), "--shards", str(t / "no_split")],
     ["step9", "does not exist"]),
    ("model_checkpoint_without_config", lambda t, m: ["--model", str(latest_without_tag(t, None)), "--out",
                                                      str(t / "out"), "--shards", str(t / "no_split")],
     ["--model", "config.json", "--model-config"]),
    # found by a second probe: accepted, then ignored
    ("threads_negative", lambda t, m: ["--model", str(m), "--out", str(t / "out"), "--threads", "-3"],
     ["--threads -3", ">= 1"]),
    ("timeout_zero", lambda t, m: ["--model", str(m), "--out", str(t / "out"), "--timeout-s", "0"],
     ["--timeout-s 0", "> 0"]),
    ("tag_for_a_save_pretrained_dir", lambda t, m: ["--model", str(m), "--out", str(t / "out"), "--tag", "step99",
                                                    "--shards", str(t / "no_split")],
     ["save_pretrained directory", "--tag", "DeepSpeed checkpoint directory"]),
    ("model_config_for_a_save_pretrained_dir", lambda t, m: ["--model", str(m), "--out", str(t / "out"),
                                                             "--model-config", str(m / "config.json"),
                                                             "--shards", str(t / "no_split")],
     ["save_pretrained directory", "--model-config"]),
]


def not_a_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("no weights here\n")
    return folder


def latest_without_tag(tmp_path: Path, model_dir: Path | None) -> Path:
    """A DeepSpeed-looking checkpoint directory whose 'latest' names a missing tag (with the model's config.json)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "latest").write_text("step9\n")
    if model_dir is not None:
        shutil.copy(model_dir / "config.json", folder / "config.json")
    return folder


@pytest.mark.parametrize("eval_args,names", [row[1:] for row in EVALUATE_ROWS], ids=[row[0] for row in EVALUATE_ROWS])
def test_evaluate_bad_input_is_one_error_line(eval_args, names, tiny_model, tmp_path, capsys):
    code = evaluate_cli.main(eval_args(tmp_path, tiny_model) + ["--device", "cpu", "--quiet"])
    assert_one_error(code, capsys.readouterr().err, *names)
    assert not (tmp_path / "out").exists()


def test_read_only_run_dir_is_one_error_line(capsys, tmp_path):
    """A run_dir on a read-only mount (as root, file modes stop nothing): one line before any work."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        code, err = finetune_cli(capsys, tmp_path, *sets(f"run_dir={mount_point / 'run'}"))
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
    assert_one_error(code, err, "run_dir", str(mount_point), "Read-only")


# ----------------------------------------------------------------------------- images in shards

def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def rotated_with_exif() -> bytes:
    """An upright 16x32 image (red top half, blue bottom) stored turned by 90 degrees with EXIF orientation 6."""
    upright = np.zeros((32, 16, 3), np.uint8)
    upright[:16], upright[16:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90 CW to display": undoes the 90-degree CCW turn below
    return encoded(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def sixteen_bit_grey() -> bytes:
    return encoded(Image.fromarray(np.full((8, 8), 32768, np.uint16)))


# (row id, encoded image, the (R, G, B) of its decoded bottom-left pixel): every mode decodes to RGB
IMAGE_ROWS = [
    ("grayscale", lambda: encoded(Image.new("L", (20, 20), 200)), (200, 200, 200)),
    ("cmyk_jpeg", lambda: encoded(Image.new("CMYK", (20, 20), (0, 0, 0, 0)), "JPEG"), (255, 255, 255)),
    ("rgba", lambda: encoded(Image.new("RGBA", (20, 20), (10, 20, 30, 0))), (10, 20, 30)),
    ("palette", lambda: encoded(Image.new("RGB", (20, 20), (0, 0, 255)).convert("P")), (0, 0, 255)),
    ("sixteen_bit", sixteen_bit_grey, (127, 127, 127)),   # was clipped to white (255)
    ("exif_rotated", rotated_with_exif, (0, 0, 255)),      # was red: the red half on the left, blue on the right
]


@pytest.mark.parametrize("image,rgb", [row[1:] for row in IMAGE_ROWS], ids=[row[0] for row in IMAGE_ROWS])
def test_every_image_mode_decodes_to_rgb(image, rgb):
    from pipeline.data.decode import DecodeSpec, decode_image
    spec = DecodeSpec(16, (0.5,) * 3, (0.5,) * 3, 8, "patch", 4, "nearest")
    pixels, _ = decode_image(image(), spec)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels[15, 0].astype(int) - rgb).max() <= 2, pixels[15, 0]


def test_exif_rotated_image_comes_out_upright():
    from pipeline.data.decode import DecodeSpec, decode_image
    spec = DecodeSpec(16, (0.5,) * 3, (0.5,) * 3, 8, "patch", 4, "nearest")
    pixels, stored = decode_image(rotated_with_exif(), spec)
    assert stored == (16, 32)   # (width, height) upright
    assert (pixels[:8] == (255, 0, 0)).all() and (pixels[8:] == (0, 0, 255)).all()


@pytest.mark.parametrize("max_side", [None, 16], ids=["passed_through", "shrunk_and_re_encoded"])
def test_make_shards_stores_exif_rotated_images_upright(max_side, tmp_path):
    """launch/make_shards.py: the stored image and its width/height are upright (re-encoding drops the EXIF tag,
    which left the image on its side)."""
    from pipeline.data.decode import DecodeSpec, decode_image
    from pipeline.data.sources import ImageOptions, load_image
    path = tmp_path / "rotated.png"
    path.write_bytes(rotated_with_exif())
    data, _, width, height, _ = load_image(path, ImageOptions(max_side=max_side))
    assert (width, height) == ((16, 32) if max_side is None else (8, 16))
    pixels, stored = decode_image(data, DecodeSpec(16, (0.5,) * 3, (0.5,) * 3, 8, "patch", 4, "nearest"))
    assert stored == (width, height)
    red, blue = pixels[:6].astype(int), pixels[10:].astype(int)   # lossy JPEG when re-encoded
    assert np.abs(red - (255, 0, 0)).max() <= 8 and np.abs(blue - (0, 0, 255)).max() <= 8


def tiff_of(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="TIFF")
    return out.getvalue()


@pytest.mark.parametrize("array,grey", [(np.full((8, 8), 32768, np.uint16), 127),
                                        (np.full((8, 8), 0.5, np.float32), 128)], ids=["sixteen_bit", "float"])
def test_make_shards_scales_a_wide_tiff_to_8_bits(array, grey, tmp_path):
    """launch/make_shards.py re-encodes a TIFF: a 16-bit one came out white (clipped at 255), a float one
    black (cast); both now come out grey, as the loader decodes the same pixels."""
    from pipeline.data.decode import DecodeSpec, decode_image
    from pipeline.data.sources import ImageOptions, load_image
    path = tmp_path / "wide.tif"
    path.write_bytes(tiff_of(array))
    data, ext, _, _, _ = load_image(path, ImageOptions())
    pixels, _ = decode_image(data, DecodeSpec(8, (0.5,) * 3, (0.5,) * 3, 8, "patch", 4, "nearest"))
    assert ext == "jpg" and np.abs(pixels.astype(int) - grey).max() <= 3, pixels[0, 0]


@pytest.mark.parametrize("side", [20, 30], ids=["bomb_warning", "bomb_error"])
def test_decompression_bomb_is_a_bad_image(side, monkeypatch):
    """Above MAX_IMAGE_PIXELS PIL only warns (and decodes: a huge allocation); above twice that it raises."""
    from pipeline.data.decode import BadSample, DecodeSpec, decode_image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)   # 20x20 = 400 px warns, 30x30 = 900 px raises
    spec = DecodeSpec(16, (0.5,) * 3, (0.5,) * 3, 8, "patch", 4, "nearest")
    with pytest.raises(BadSample) as bad:
        decode_image(encoded(Image.new("RGB", (side, side))), spec)
    assert bad.value.reason == "bad_image"


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    import tarfile
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bomb_and_duplicate_members_in_a_shard_are_counted_skips(tmp_path, monkeypatch, tiny_data):
    """A shard with a decompression bomb (skipped, counted `bad_image`), a sample whose image member repeats
    (the repeat is skipped and counted `duplicate_member`; the sample keeps its first image) and a key that comes
    back later in the shard (its second sample skipped, counted `duplicate_key`): the rest trains, and the
    evaluation reader counts the same."""
    from pipeline.data.eval_split import load_eval_split
    from pipeline.data.loader import LoaderConfig, StreamingLoader
    from pipeline.data.tokenizer import load_tokenizer
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    small = encoded(Image.new("RGB", (16, 16), (200, 30, 30)))
    members = [(f"k{i}.{ext}", data) for i in range(4) for ext, data in (("png", small), ("txt", b"a red square"))]
    members += [("bomb.png", encoded(Image.new("RGB", (30, 30)))), ("bomb.txt", b"a black square")]
    members += [("dup.png", small), ("dup.png", small), ("dup.txt", b"twice")]
    members += [("k1.png", small), ("k1.txt", b"k1 again, not next to its first sample")]
    split = tmp_path / "split"
    split.mkdir()
    tar_of(split / "00000.tar", members)
    tokenizer = load_tokenizer(tiny_data["tokenizer"])
    cfg = LoaderConfig(shards=str(split), batch_size=2, image_size=16, num_workers=0, shuffle=False)
    loader = StreamingLoader(cfg, tokenizer)
    keys = [k for batch in loader for k in batch["keys"]]
    assert set(keys) == {"k0", "k1", "k2", "k3", "dup"} and len(keys) == 2 * loader.batches_per_epoch
    assert loader.skipped == {"bad_image": 1, "duplicate_member": 1, "duplicate_key": 1}
    evaluated = load_eval_split(str(split), tokenizer, cfg)
    assert evaluated.image_keys == ["k0", "k1", "k2", "k3", "dup"]
    assert evaluated.skipped == {"bad_image": 1, "duplicate_member": 1, "duplicate_key": 1}


# ----------------------------------------------------------------------------- real runs: failures after start-up

def training_sets(tiny_data: dict, run_dir: Path, *extra: str) -> list[str]:
    from test_training import common_sets
    base = common_sets(tiny_data, run_dir, None, steps=2)
    return sets(*base, "train.val_every=0", "eval.test=false", "checkpoint.export=false", *extra)


@pytest.fixture(scope="module")
def garbage_train(tmp_path_factory) -> Path:
    """A train split whose images are all undecodable."""
    bad = [Sample(key=f"k{i}", image=b"not an image", image_ext="jpg", meta={"captions": ["a red square"]})
           for i in range(16)]
    root = tmp_path_factory.mktemp("garbage") / "train"
    write_split(bad, root, "train", max_samples=8, progress=False)
    return root


# (row id, --set assignments beyond the tiny run's (from tiny_data, garbage split), exit code, what stderr names)
RUN_ROWS = [
    # python launch/finetune.py without a launcher (no deepspeed/mpirun/torchrun, no mpi4py): one process
    ("no_launcher_one_process", lambda d, g: [], 0, []),
    ("no_decodable_samples_with_workers", lambda d, g: [f"data.train={g}", "data.num_workers=2"], 2,
     ["no decodable samples", "bad_image"]),
    ("no_decodable_samples_in_process", lambda d, g: [f"data.train={g}"], 2, ["no decodable samples"]),
]


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE",
                      "PMI_SIZE")


def run_row_id(row) -> str:
    return row.values[0] if hasattr(row, "values") else row[0]


@pytest.mark.parametrize("row_id,extra,code,names", RUN_ROWS, ids=[run_row_id(r) for r in RUN_ROWS])
def test_training_run_bad_input(row_id, extra, code, names, tiny_data, garbage_train, tmp_path):
    """A real short one-process run, as a user starts it (`python launch/finetune.py`, no launcher)."""
    argv = ["--deepspeed_config", str(ZERO2), *training_sets(tiny_data, tmp_path / "run",
                                                             *extra(tiny_data, garbage_train))]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    result = subprocess.run([sys.executable, "launch/finetune.py", *argv], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    if code == 0:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "[finetune] step 2/2" in result.stdout
        return
    assert_one_error(result.returncode, result.stderr, *names)
