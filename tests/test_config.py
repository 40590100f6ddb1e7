"""Experiment config: YAML + --set overrides, one-line user errors (exit 2) before any process-group work,
and the single-source rule between the experiment config and the DeepSpeed JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config, read_ds_config, resolve_ds_config
from pipeline.data.paths import validate_paths
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent
ZERO2 = REPO / "ds_configs" / "zero2.json"


def run_finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    return subprocess.run([sys.executable, str(REPO / "launch" / "finetune.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    # rejected before DeepSpeed set up a process group
    assert "Initializing TorchBackend" not in proc.stdout + proc.stderr


@pytest.fixture
def ds_file(tmp_path):
    def make(**changes) -> Path:
        ds = json.loads(ZERO2.read_text())
        ds.update(changes)
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        return path
    return make


# ----------------------------------------------------------------------------- CLI, exit code 2

def test_unknown_key_exits_2(tmp_path):
    proc = run_finetune("--set", "train.stepz=5", cwd=tmp_path)
    assert_user_error(proc, "train.stepz", "unknown")


def test_wrong_type_exits_2(tmp_path):
    proc = run_finetune("--set", "finetune.hard_size=many", cwd=tmp_path)
    assert_user_error(proc, "finetune.hard_size", "many")


def test_missing_shards_exit_2(tmp_path):
    missing = tmp_path / "nowhere" / "train"
    proc = run_finetune("--set", "data.synthetic=null", "--set", f"data.train={missing}",
                        "--set", f"data.val={missing}", cwd=tmp_path)
    assert_user_error(proc, "data.train", str(missing))


def test_contradicting_ds_config_exits_2(tmp_path, ds_file):
    ds = ds_file(train_micro_batch_size_per_gpu=8)
    proc = run_finetune("--deepspeed_config", str(ds), "--set", "train.micro_batch_size=16", cwd=tmp_path)
    assert_user_error(proc, "train_micro_batch_size_per_gpu=8", "train.micro_batch_size", "16")


def test_unknown_key_in_yaml_file_exits_2(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("train:\n  steps: 3\n  learning_rate: 0.1\n")
    proc = run_finetune("--config", str(cfg), cwd=tmp_path)
    assert_user_error(proc, "train.learning_rate")


def test_help_documents_options_and_keys(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "finetune.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for needle in ("--config", "--set", "--deepspeed_config", "--resume", "--num_gpus", "finetune.iais.alignment",
                   "finetune.negative_size", "train.micro_batch_size", "checkpoint.resume", "pool_bytes(cfg)"):
        assert needle in proc.stdout, needle


# ----------------------------------------------------------------------------- in-process rules

def _cfg(*sets: str):
    return load_config(None, ["data.synthetic={}", *sets])


def test_overrides_are_yaml_typed():
    cfg = _cfg("train.steps=7", "finetune.iais.layers=[-1, -2]", "train.lr=5e-5", "tracking.enabled=false")
    assert cfg.train.steps == 7 and cfg.finetune.iais.layers == [-1, -2]
    assert cfg.train.lr == 5e-5 and cfg.tracking.enabled is False


def test_null_unsets_an_optional_section(tmp_path):
    demo = REPO / "launch" / "configs" / "demo_tiny.yaml"
    assert load_config(demo).data.synthetic is not None
    assert load_config(demo, ["data.synthetic=null", "data.root=shards"]).data.synthetic is None
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  synthetic: null\n  train: shards/train\ntracking:\n")
    cfg = load_config(path)
    assert cfg.data.synthetic is None and cfg.tracking.enabled   # an empty required section keeps its defaults


def test_auto_values_fill_each_other():
    cfg = _cfg("train.micro_batch_size=16", "train.lr=0.001", "train.warmup_steps=10", "train.steps=100")
    ds = resolve_ds_config(read_ds_config(ZERO2), cfg, world_size=2, accelerator="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["optimizer"]["params"]["lr"] == 0.001
    assert ds["scheduler"]["params"]["total_num_steps"] == 100
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 10
    assert ds["bf16"]["enabled"] is False          # "auto" on CPU -> fp32
    assert cfg.train.grad_accum == 1               # from the JSON


def test_both_auto_is_an_error():
    cfg = _cfg("train.lr=0.001", "train.warmup_steps=1")
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu.*auto.*train.micro_batch_size"):
        resolve_ds_config(read_ds_config(ZERO2), cfg, world_size=1, accelerator="cpu")


@pytest.mark.parametrize("changes, sets, needle", [
    ({"gradient_accumulation_steps": 2}, ["train.grad_accum=4"], "gradient_accumulation_steps=2"),
    ({"train_batch_size": 48}, [], "train_batch_size=48"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50, "warmup_num_steps": "auto"}}},
     ["train.steps=100"], "total_num_steps=50"),
    ({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, [], "AdamW"),
])
def test_ds_contradictions(changes, sets, needle):
    cfg = _cfg("train.micro_batch_size=8", "train.lr=0.001", "train.warmup_steps=1", *sets)
    ds = read_ds_config(ZERO2)
    ds.update(changes)
    with pytest.raises(UserError, match=needle):
        resolve_ds_config(ds, cfg, world_size=2, accelerator="cpu")


def test_missing_shard_in_brace_pattern(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    cfg = load_config(None, [f"data.train={tmp_path}/{{00000..00001}}.tar", f"data.val={tmp_path}",
                             "eval.test=false"])
    with pytest.raises(UserError, match="00001.tar"):
        validate_paths(cfg, "finetune")


def test_shipped_configs_load():
    for name in ("demo_tiny.yaml", "flickr30k_base.yaml", "coco_base.yaml", "pretrain_tiny.yaml"):
        cfg = load_config(REPO / "launch" / "configs" / name)
        assert cfg.train.steps > 0
    for name in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        ds = read_ds_config(REPO / "ds_configs" / f"{name}.json")
        assert ds["optimizer"]["params"]["torch_adam"] is True
        assert ds["bf16"]["enabled"] == "auto"
    paper = load_config(REPO / "launch" / "configs" / "flickr30k_base.yaml")
    assert (paper.finetune.negative_size, paper.finetune.hard_size, paper.train.lr, paper.train.steps,
            paper.train.warmup_steps, paper.finetune.margin, paper.finetune.iais.schedule) == (
        399, 31, 5e-5, 5000, 500, 0.2, "exp")


@pytest.mark.parametrize("name", ["flickr30k_base.yaml", "coco_base.yaml"])
def test_paper_configs_carry_the_authors_optimiser_and_balance(name):
    """UNITER/IAIS: AdamW betas (0.9, 0.98), wd 0.01 without biases/LayerNorm, linear decay to 0, clip 2.0,
    both directions every step, IAIS weight 8 (their rank.mean() / train_batch_size + s(t) IAIS)."""
    cfg = load_config(REPO / "launch" / "configs" / name)
    ds = resolve_ds_config(read_ds_config(ZERO2), cfg, world_size=1, accelerator="cpu")
    assert ds["gradient_clipping"] == 2.0
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    sp = ds["scheduler"]["params"]
    assert (sp["warmup_num_steps"], sp["total_num_steps"], sp["warmup_min_lr"], sp["warmup_max_lr"],
            sp["warmup_type"]) == (500, 5000, 0.0, 5e-5, "linear")
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98] and ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert not cfg.train.decay_bias_and_norm
    ft = cfg.finetune
    assert (ft.directions, ft.iais.side, ft.iais.weight, cfg.train.micro_batch_size) == ("both", "alternate", 8.0, 8)


def test_schedule_and_clipping_default_when_both_auto_and_must_agree():
    cfg = _cfg("train.micro_batch_size=8", "train.lr=0.001", "train.warmup_steps=1")
    ds = resolve_ds_config(read_ds_config(ZERO2), cfg, world_size=1, accelerator="cpu")
    assert ds["gradient_clipping"] == 1.0 and ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["cos_min_ratio"] == 0.01
    own = read_ds_config(ZERO2)
    own["gradient_clipping"], own["scheduler"]["type"] = 1.0, "WarmupCosineLR"
    for sets, needle in ((["train.grad_clip=2.0"], "gradient_clipping=1.0"),
                         (["train.lr_schedule=linear"], "scheduler.type")):
        cfg = _cfg("train.micro_batch_size=8", "train.lr=0.001", "train.warmup_steps=1", *sets)
        with pytest.raises(UserError, match=needle):
            resolve_ds_config(own, cfg, world_size=1, accelerator="cpu")


def test_parameter_groups_exempt_biases_and_norms_from_decay():
    import models
    from pipeline.train.runtime import parameter_groups
    model = models.create_model("tiny")
    decay, exempt = parameter_groups(model, decay_bias_and_norm=False)
    names = {id(p): n for n, p in model.named_parameters()}
    assert exempt["weight_decay"] == 0.0 and "weight_decay" not in decay
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert all(n.endswith("bias") or "norm" in n.lower() or "ln" in n.lower() for n in exempt_names)
    assert any(n.endswith("bias") for n in exempt_names) and any(not n.endswith("bias") for n in exempt_names)
    decay_names = {names[id(p)] for p in decay["params"]}
    assert not any(n.endswith("bias") or n.endswith("norm.weight") for n in decay_names)
    assert "embeddings.word.weight" in decay_names or any("embeddings" in n for n in decay_names)
    assert len(decay["params"]) + len(exempt["params"]) == len(list(model.parameters()))
    assert len(parameter_groups(model, decay_bias_and_norm=True)) == 1


def _complete_checkpoint(ckpt: Path, step: int, cfg) -> None:
    import json
    from pipeline.config import training_fingerprint
    from pipeline.train.checkpoint import COMPLETE_FILE
    tag = ckpt / f"step{step:07d}"
    tag.mkdir(parents=True)
    (tag / COMPLETE_FILE).write_text(json.dumps({"step": step, "world_size": 2,
                                                 "config": training_fingerprint(cfg)}))


def test_a_key_newer_than_the_checkpoint_is_a_change_only_away_from_its_default(tmp_path):
    """A checkpoint or pretraining export written before train.nonfinite existed still resumes / is reused
    while the key is at its default; set to something else, it is a change like any other."""
    import json
    from pipeline.config import fingerprint_changes, training_fingerprint
    from pipeline.train.checkpoint import COMPLETE_FILE, check_resume_config, resume_point
    cfg = _cfg(f"run_dir={tmp_path}", "checkpoint.resume=auto")
    older = {k: v for k, v in training_fingerprint(cfg).items() if k != "train.nonfinite"}
    assert fingerprint_changes(older, training_fingerprint(cfg)) == []
    skipping = _cfg(f"run_dir={tmp_path}", "checkpoint.resume=auto", "train.nonfinite=skip")
    assert fingerprint_changes(older, training_fingerprint(skipping)) == ["train.nonfinite: (absent) -> 'skip'"]
    removed = dict(older, **{"train.retired_key": 1})
    assert fingerprint_changes(removed, training_fingerprint(cfg)) == ["train.retired_key: 1 -> (absent)"]
    tag = tmp_path / "checkpoints" / "step0000003"
    tag.mkdir(parents=True)
    (tag / COMPLETE_FILE).write_text(json.dumps({"step": 3, "world_size": 1, "config": older}))
    check_resume_config(cfg, resume_point(cfg))
    with pytest.raises(UserError, match=r"train\.nonfinite: \(absent\) -> 'skip'"):
        check_resume_config(skipping, resume_point(skipping))


def test_resume_picks_the_newest_complete_checkpoint_and_checks_its_config(tmp_path):
    from pipeline.train.checkpoint import check_resume_config, resume_point
    cfg = _cfg(f"run_dir={tmp_path}", "checkpoint.resume=auto", "train.lr=0.001")
    ckpt = tmp_path / "checkpoints"
    assert resume_point(cfg) is None                                   # auto and nothing saved: a fresh run
    _complete_checkpoint(ckpt, 3, cfg)
    (ckpt / "step0000006").mkdir()                                      # killed while saving step 6
    (ckpt / "latest").write_text("step0000006")
    assert resume_point(cfg) == (ckpt, "step0000003")
    check_resume_config(cfg, resume_point(cfg))
    same_training = _cfg(f"run_dir={tmp_path}", "checkpoint.resume=auto", "train.lr=0.001", "train.log_every=5",
                         "tracking.enabled=false", "eval.score_batch=7")
    check_resume_config(same_training, resume_point(same_training))
    changed = _cfg(f"run_dir={tmp_path}", "checkpoint.resume=auto", "train.lr=0.002", "finetune.margin=0.3")
    with pytest.raises(UserError, match=r"finetune\.margin: 0\.2 -> 0\.3; train\.lr: 0\.001 -> 0\.002"):
        check_resume_config(changed, resume_point(changed))
    forced = _cfg(f"run_dir={tmp_path}", "checkpoint.resume=auto", "train.lr=0.002",
                  "checkpoint.ignore_config_change=true")
    check_resume_config(forced, resume_point(forced))
    with pytest.raises(UserError, match="no complete checkpoint"):
        resume_point(_cfg(f"run_dir={tmp_path / 'other'}", "checkpoint.resume=true"))


# ----------------------------------------------------------------------------- every user error before start()

def _saved_model_dir(tmp_path: Path) -> Path:
    import models
    model = models.create_model("tiny", vocab_size=50, num_layers=2)
    model.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def _prepare(tmp_path: Path, *sets: str):
    from pipeline.train import runtime
    base = ["data.synthetic={}", f"run_dir={tmp_path / 'run'}", "train.micro_batch_size=8", "train.lr=0.001",
            "train.warmup_steps=1"]
    return runtime.prepare("finetune", None, [*base, *sets], str(ZERO2))


@pytest.mark.parametrize("sets, key", [
    (["tracking.queue_size=0"], "tracking.queue_size"),
    (["tracking.http_timeout_s=-1"], "tracking.http_timeout_s"),
    (["data.max_regions=0"], "data.max_regions"),
    (["data.image_size=4"], "data.image_size"),
    (["data.max_text_len=2"], "data.max_text_len"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data.shuffle_buffer=0"], "data.shuffle_buffer"),
    (["train.log_every=0"], "train.log_every"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=-0.1"], "train.lr"),
    (["train.threads=-2"], "train.threads"),
    (["train.val_every=-1"], "train.val_every"),
    (["finetune.iais.layers=[3]"], "finetune.iais.layers"),      # the tiny preset has 3 layers: -3..2
    (["finetune.iais.layers=[-4]"], "finetune.iais.layers"),
    (["checkpoint.every=-1"], "checkpoint.every"),
    (["finetune.margin=-0.1"], "finetune.margin"),
    (["finetune.iais.weight=-1"], "finetune.iais.weight"),
    (["model.preset=no_such_preset"], "no_such_preset"),
    (["model.preset=nowhere/model"], "model.preset"),
    (["pretrain.itm_other_images=0"], "pretrain.itm_other_images"),
    (["pretrain.itm_other_images=8", "pretrain.itm_loss=bce"], "pretrain.itm_other_images"),   # micro batch 8
    (["grounding.regression_weight=-1"], "regression_weight"),
    (["grounding.attention_weight=0", "grounding.regression_weight=0"], "attention_weight"),
    (["grounding.regression=l2"], "grounding.regression"),
])
def test_user_errors_are_found_before_any_process_group(tmp_path, sets, key):
    with pytest.raises(UserError) as caught:
        _prepare(tmp_path, *sets)
    message = str(caught.value)
    assert key in message and "\n" not in message, message
    value = sets[0].split("=", 1)[1]
    assert value.strip("[]") in message, message


def test_valid_edges_pass_prepare(tmp_path):
    _prepare(tmp_path, "finetune.iais.layers=[-3, 2]", "train.threads=0", "checkpoint.every=0",
             "finetune.margin=0", "finetune.iais.weight=0", "data.num_workers=0", "data.max_text_len=3")


def test_a_save_pretrained_dir_as_preset_validates_and_builds_the_same_model(tmp_path):
    from pipeline.train.build import build_model, model_config
    saved = _saved_model_dir(tmp_path)
    cfg, _ = _prepare(tmp_path, f"model.preset={saved}", "finetune.iais.layers=[-2]")
    model = build_model(cfg, vocab_size=50)
    assert model.config == model_config(cfg, vocab_size=50) and model.config.num_layers == 2
    with pytest.raises(UserError, match="finetune.iais.layers"):           # its 2 layers, not the preset's 3
        _prepare(tmp_path, f"model.preset={saved}", "finetune.iais.layers=[2]")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model.preset"):
        _prepare(tmp_path, f"model.preset={tmp_path / 'empty'}")


def test_loader_config_shares_the_data_rules():
    from pipeline.data.loader import LoaderConfig
    with pytest.raises(UserError, match="max_regions"):
        LoaderConfig(shards="x", max_regions=0)
    with pytest.raises(UserError, match="max_text_len"):
        LoaderConfig(shards="x", max_text_len=2)


def test_pool_size_help_states_the_memory_bound():
    import dataclasses
    from pipeline.config import FinetuneConfig
    (pool_size,) = [f for f in dataclasses.fields(FinetuneConfig) if f.name == "pool_size"]
    assert "pool_bytes" in pool_size.metadata["help"] and "coco_base.yaml 3.14 GiB" in pool_size.metadata["help"]


def test_tracking_error_exits_2_before_deepspeed(tmp_path):
    proc = run_finetune("--set", "tracking.queue_size=0", cwd=tmp_path)
    assert_user_error(proc, "tracking.queue_size", "0")
