"""What a job's MLflow run is named and tagged with (pipeline/train/run_tracking.py); the real runs are checked in
tests/test_slurm.py and tests/test_multinode.py."""
from __future__ import annotations

import torch

from pipeline.config import load_config
from pipeline.train import run_tracking
from pipeline.train.runtime import Run
from pipeline.train.stages import write_stamp


def make_run(tmp_path, stage: str, *sets: str) -> Run:
    cfg = load_config(None, [f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}",
                             "data.test=null", *sets])
    ds = {"zero_optimization": {"stage": 3}}
    return Run(cfg=cfg, ds_config=ds, stage=stage, run_dir=tmp_path / "run", device=torch.device("cpu"))


def test_a_finetune_from_an_exported_pretraining_run_is_its_child(tmp_path):
    model_dir = tmp_path / "pre" / "model"
    model_dir.mkdir(parents=True)
    pre_cfg = load_config(None, ["data.train=x"])
    write_stamp(model_dir, pre_cfg, "abc123")
    tags = run_tracking.run_tags(make_run(tmp_path, "finetune", f"model.init={model_dir}",
                                          "model.pretrain_config=null"))
    assert tags["mlflow.parentRunId"] == "abc123"
    assert (tags["relalign.stage"], tags["relalign.zero_stage"], tags["relalign.preset"]) == ("finetune", "3", "tiny")
    assert tags["relalign.iais_alignment"] == "singular"


def test_pretraining_and_a_zero_iais_weight_say_none_and_have_no_parent(tmp_path):
    assert run_tracking.run_tags(make_run(tmp_path, "pretrain"))["relalign.iais_alignment"] == "none"
    tags = run_tracking.run_tags(make_run(tmp_path, "finetune", "finetune.iais.weight=0.0",
                                          "model.pretrain_config=null"))
    assert tags["relalign.iais_alignment"] == "none" and "mlflow.parentRunId" not in tags


def test_each_attempt_is_tagged_with_its_restart_nodes_and_resume_point():
    env = {"SLURM_RESTART_COUNT": "2", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77"}
    tags = run_tracking.attempt_tags({"step": 40}, "hostA", env)
    assert tags == {"relalign.restart_count": "2", "relalign.nodes": "gpu[01-02]", "relalign.slurm_job_id": "77",
                    "relalign.resumed_from": "step0000040"}
    assert run_tracking.attempt_tags(None, "hostA", {}) == {"relalign.restart_count": "0", "relalign.nodes": "hostA"}


def test_dataset_inputs_name_each_split_with_a_digest_of_its_manifest(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text('{"a": 1}')
    refs = {r.name: r for r in run_tracking.dataset_refs(make_run(tmp_path, "finetune"))}
    assert set(refs) == {"train", "val"}    # no test split configured
    assert refs["train"].context == "train" and refs["train"].source_type == "local"
    (tmp_path / "train" / "manifest.json").write_text('{"a": 2}')
    assert run_tracking.dataset_refs(make_run(tmp_path, "finetune"))[0].digest != refs["train"].digest
