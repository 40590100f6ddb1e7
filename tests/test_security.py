"""Nothing the project loads runs code: a pickle crafted to write a marker file on load is refused, as a
one-line error naming the file, on every path (evaluate, model.init, resume, export/consolidation, UNITER
import); corrupt files and mismatched inits are one-line errors too; ZeRO 0/2/3 checkpoints still resume."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_training import TINY_MODEL, common_sets

REPO = Path(__file__).resolve().parent.parent
TAG = "step0000002"
# the module fixture runs once: under pytest-xdist every test of this file runs on one worker
pytestmark = pytest.mark.xdist_group("security")


class WritesMarker:
    """Unpickling this calls os.system: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path, key: str = "module") -> Path:
    torch.save({key: WritesMarker(marker), "extra": torch.zeros(2)}, path)
    return path


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def assert_refused(text: str, file: Path, marker: Path) -> None:
    assert not marker.exists(), "the crafted pickle ran"
    assert str(file) in text and "refused to load" in text and "posix.system" in text, text
    assert "\n" not in text.strip() and "Traceback" not in text, text


# ----------------------------------------------------------------------------- one real run to tamper with

@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """run_dir of a real 2-step ZeRO-2 finetune run (one process): checkpoints/step0000002 + model/."""
    run_dir = tmp_path_factory.mktemp("secure_run") / "run"
    cmd = [sys.executable, "launch/finetune.py", "--deepspeed_config", "ds_configs/zero2.json"]
    for s in common_sets(tiny_data, run_dir, None, steps=2) + ["eval.test=false", "checkpoint.every=0"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert (run_dir / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    return run_dir


def copy_run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.mark.slow
def test_evaluate_cli_refuses_a_crafted_model_states_file(trained, tiny_data, tmp_path):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "MARKER"
    bad = craft(run / "checkpoints" / TAG / "mp_rank_00_model_states.pt", marker)
    proc = subprocess.run([sys.executable, "launch/evaluate.py", "--model", str(run / "checkpoints"),
                           "--shards", str(tiny_data["root"] / "test"), "--tokenizer", str(tiny_data["tokenizer"]),
                           "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert_refused(errors[0], bad, marker)
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_refuses_a_crafted_zero_shard(trained, tiny_data, tmp_path):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "MARKER"
    bad = craft(run / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker,
                key="optimizer_state_dict")
    cmd = [sys.executable, "launch/finetune.py", "--deepspeed_config", "ds_configs/zero2.json", "--resume"]
    for s in common_sets(tiny_data, run, None, steps=2) + ["eval.test=false", "checkpoint.every=0"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-5000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-5000:]
    assert_refused(errors[0], bad, marker)


@pytest.mark.slow
def test_consolidation_evaluate_and_init_refuse_a_crafted_zero_shard(trained, tiny_data, tmp_path):
    from pipeline.errors import UserError
    from pipeline.evaluation.loading import load_model
    from pipeline.train.build import build_model
    from pipeline.train.checkpoint import checkpoint_state_dict
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "MARKER"
    bad = craft(run / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker,
                key="optimizer_state_dict")
    with pytest.raises(UserError) as export:   # what export_pretrained consolidates with
        checkpoint_state_dict(run / "checkpoints", TAG)
    assert_refused(str(export.value), bad, marker)
    with pytest.raises(UserError) as evaluate:
        load_model(str(run / "checkpoints"))
    assert_refused(str(evaluate.value), bad, marker)
    with pytest.raises(UserError) as init:
        build_model(tiny_cfg(tiny_data, tmp_path, f"model.init={run / 'checkpoints'}"), 100)
    assert_refused(str(init.value), bad, marker)


@pytest.mark.slow
def test_corrupt_save_pretrained_files_are_one_line_errors(trained, tmp_path):
    from pipeline.errors import UserError
    from pipeline.evaluation.loading import load_model
    model_dir = copy_run(trained, tmp_path) / "model"
    weights = model_dir / "model.safetensors"
    good = weights.read_bytes()
    for content in (b"", good[:len(good) // 2], b"\x10" + b"\x00" * 7 + b"{not json"):
        weights.write_bytes(content)
        with pytest.raises(UserError, match="model.safetensors") as exc:
            load_model(str(model_dir))
        assert "\n" not in str(exc.value)
    weights.write_bytes(good)
    (model_dir / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        load_model(str(model_dir))
    (model_dir / "config.json").write_text('{"hidden_sise": 32}')
    with pytest.raises(UserError, match="config.json.*unknown field"):
        load_model(str(model_dir))


# ----------------------------------------------------------------------------- files without a run

def tiny_cfg(tiny_data, tmp_path: Path, *sets: str):
    from pipeline.config import load_config
    return load_config(None, common_sets(tiny_data, tmp_path / "unused", None) + list(sets))


def test_resume_refuses_a_crafted_client_file(tmp_path):
    from pipeline.errors import UserError
    from pipeline.train.checkpoint import CLIENT_FILE, load_checkpoint
    from pipeline.train.runtime import Run

    class LoadedEngine:   # DeepSpeed's part of the resume succeeded; our client file is next
        def load_checkpoint(self, path, **kw):
            return path, {}

    marker = tmp_path / "MARKER"
    (tmp_path / "ckpt" / TAG).mkdir(parents=True)
    bad = craft(tmp_path / "ckpt" / TAG / CLIENT_FILE.format(rank=0), marker, key="rng")
    run = Run(cfg=None, ds_config={}, stage="finetune", run_dir=tmp_path, device=torch.device("cpu"))
    with pytest.raises(UserError) as exc:
        load_checkpoint(LoadedEngine(), run, (tmp_path / "ckpt", TAG))
    assert_refused(str(exc.value), bad, marker)


def test_init_and_uniter_import_refuse_a_crafted_pt(tiny_data, tmp_path):
    from models import ConfigError, load_uniter_checkpoint
    from pipeline.errors import UserError
    from pipeline.train.build import build_model
    marker = tmp_path / "MARKER"
    bad = craft(tmp_path / "uniter.pt", marker, key="model")
    with pytest.raises(UserError) as exc:
        build_model(tiny_cfg(tiny_data, tmp_path, f"model.init={bad}"), 100)
    assert_refused(str(exc.value), bad, marker)
    with pytest.raises(ConfigError) as api:   # models/ keeps its own (pure torch) error type
        load_uniter_checkpoint(str(bad))
    assert_refused(str(api.value), bad, marker)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="empty.pt: not a readable torch checkpoint"):
        build_model(tiny_cfg(tiny_data, tmp_path, f"model.init={tmp_path / 'empty.pt'}"), 100)


def stage0_checkpoint(directory: Path, state: dict) -> Path:
    """A DeepSpeed stage-0 checkpoint directory holding just ``state`` as its module weights."""
    (directory / "t").mkdir(parents=True)
    (directory / "latest").write_text("t")
    torch.save({"module": state}, directory / "t" / "mp_rank_00_model_states.pt")
    return directory


def test_init_whose_keys_match_nothing_fails(tiny_data, tmp_path):
    from pipeline.errors import UserError
    from pipeline.train.build import build_model
    init = stage0_checkpoint(tmp_path / "other", {"backbone.conv.weight": torch.zeros(3, 3)})
    with pytest.raises(UserError, match="none of its 1 weights is a weight of this model"):
        build_model(tiny_cfg(tiny_data, tmp_path, f"model.init={init}"), 100)


def test_init_reports_missing_and_unexpected_keys(tiny_data, tmp_path, capsys):
    from models import RetrievalModel
    from pipeline.train.build import build_model, model_config
    cfg = tiny_cfg(tiny_data, tmp_path)
    state = RetrievalModel(model_config(cfg, 100)).state_dict()
    itm = state.pop("itm_head.weight").clone()
    state["old_head.weight"] = torch.zeros(2)
    init = stage0_checkpoint(tmp_path / "partial", state)
    model = build_model(tiny_cfg(tiny_data, tmp_path, f"model.init={init}"), 100)
    report = capsys.readouterr().out
    assert "1 missing, kept as initialised: itm_head.weight" in report, report
    assert "1 unexpected, ignored: old_head.weight" in report, report
    torch.testing.assert_close(model.pooler.dense.weight, state["pooler.dense.weight"].float())
    assert not torch.equal(model.itm_head.weight, itm)


# ----------------------------------------------------------------------------- normal checkpoints still load

ROUND_TRIP = r"""
import sys, torch
from pipeline.config import read_ds_config, resolve_ds_config, load_config
from pipeline.train import runtime as T, checkpoint as ckpt
from pipeline.train.build import build_model
cfg = load_config(None, sys.argv[2:])
run = None
for stage in (0, 2, 3):
    ds = resolve_ds_config(read_ds_config(f"ds_configs/zero{stage}.json"), cfg, 1, "cpu", src="ds",
                           bf16_supported=False)
    run = T.start(cfg, ds, "finetune") if run is None else T.Run(cfg=cfg, ds_config=ds, stage="finetune",
                                                              run_dir=run.run_dir / f"z{stage}", device=run.device)
    engine = T.create_engine(build_model(cfg, 100), run)
    ids = torch.randint(0, 100, (2, 8))
    loss = engine.module.embed_text({"input_ids": ids, "text_mask": torch.ones_like(ids)}).sum()
    engine.backward(loss)
    engine.step()
    tag = ckpt.save_checkpoint(engine, run, 1, {"epoch": 0, "batches": 1}, None, {"best_rsum": float("-inf")})
    saved = {k: v.clone() for k, v in ckpt.checkpoint_state_dict(run.ckpt_dir, tag).items()}
    fresh = T.create_engine(build_model(cfg, 100), run)
    client = ckpt.load_checkpoint(fresh, run, (run.ckpt_dir, tag))
    again = ckpt.checkpoint_state_dict(run.ckpt_dir, tag)
    assert client["step"] == 1 and client["loader"] == {"epoch": 0, "batches": 1}, client
    assert fresh.global_steps == 1, fresh.global_steps
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    print(f"ZERO{stage} OK", flush=True)
"""


@pytest.mark.slow
def test_zero_0_2_3_checkpoints_save_and_resume_through_the_safe_loader(tiny_data, tmp_path):
    sets = common_sets(tiny_data, tmp_path / "rt", None) + [TINY_MODEL]
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, "-"] + sets, cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert all(f"ZERO{s} OK" in out for s in (0, 2, 3)), out[-3000:]


class _EnumAsOldPythonPicklesIt:
    """As some Python 3.11 releases (Debian 12's 3.11.2) pickle an enum member: getattr(EnumClass, "NAME")."""

    def __init__(self, cls, name: str) -> None:
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_enum_members_pickled_through_getattr_load_and_other_getattr_uses_are_refused(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from pipeline.errors import UserError
    from pipeline.train import safe_load
    ok = tmp_path / "enum.pt"
    torch.save({"stage": _EnumAsOldPythonPicklesIt(ZeroStageEnum, "gradients")}, ok)
    assert safe_load.load(ok)["stage"] is ZeroStageEnum.gradients
    bad = tmp_path / "getattr.pt"
    torch.save({"x": _EnumAsOldPythonPicklesIt(LossScaler, "__init__")}, bad)
    with pytest.raises(UserError, match="refused to load"):
        safe_load.load(bad)
