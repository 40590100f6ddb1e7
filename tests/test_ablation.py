"""launch/ablation.py: the paired statistics by hand, bad input, and the driver end to end with real `deepspeed`
fine-tunes on a tiny synthetic dataset, logging to a real MLflow server.

One driver invocation (module fixture) runs none, distributed and singular for seed 0; distributed is made to
crash at start-up (its run directory holds a checkpoint of another config), so the same invocation shows the
crash report and the next variant still running. The re-run test then runs the same command again."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.ablation.results import METRICS
from pipeline.ablation.stats import paired_difference, summarize, t_half_width
from pipeline.ablation.tracking import tags_set
from pipeline.config import apply_override

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "launch" / "configs" / "ablation_tiny.yaml"
# the module fixture runs once: under pytest-xdist every test of this file runs on one worker
pytestmark = pytest.mark.xdist_group("ablation")
EXPERIMENT = "pytest-ablation"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_MODEL = ("model.overrides={hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, "
              "itc_dim: 16, dropout: 0.0, init_std: 0.1}")


# ----------------------------------------------------------------------------- statistics by hand

def test_paired_difference_and_t_interval_by_hand():
    baseline = {0: 10.0, 1: 20.0, 2: 30.0}
    variant = {0: 11.0, 1: 22.0, 2: 33.0, 7: 99.0}        # diffs 1, 2, 3; seed 7 has no baseline partner
    d = paired_difference(variant, baseline)
    # mean 2, sample std 1, t(0.975, df=2) = 4.302652729..., half-width 4.302652729 / sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(2.0)
    assert d.half_width == pytest.approx(2.4841377, abs=1e-6)
    assert (d.low, d.high) == pytest.approx((2.0 - 2.4841377, 2.0 + 2.4841377), abs=1e-6)
    s = summarize([1.0, 2.0, 3.0, float("nan"), None])   # absent / undefined values do not count
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert t_half_width(2.0, 4) == pytest.approx(3.182446305 * 2.0 / 2.0, abs=1e-6)   # t(0.975, 3) = 3.1824...


def test_one_seed_gives_the_difference_without_an_interval():
    d = paired_difference({0: 5.5}, {0: 4.0, 1: 3.0})
    assert d.n == 1 and d.mean == pytest.approx(1.5) and math.isnan(d.half_width)
    assert math.isnan(summarize([4.0]).std) and paired_difference({}, {0: 1.0}).n == 0


def test_child_tags_override_keeps_dotted_keys_and_string_values():
    raw: dict = {}
    apply_override(raw, tags_set({"mlflow.parentRunId": "1234e5", "ablation_variant": "none", "ablation_seed": 0}))
    assert raw == {"tracking": {"tags": {"mlflow.parentRunId": "1234e5", "ablation_variant": "none",
                                         "ablation_seed": "0"}}}


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, says", [
    (["--variants", "none,bogus"], "unknown variant(s) bogus"),
    (["--variants", "singular,distributed"], "baseline 'none'"),
    (["--seeds", "0"], "at least 1 seed"),
    (["--config", "no/such.yaml"], "does not exist"),
    (["--set", "run_dir=elsewhere"], "use --out"),
    (["--out", "/proc/relalign_ablation"], "cannot write in /proc"),   # was a traceback (a later --out wins)
    (["--out", __file__], "exists and is not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(args, says, tmp_path):
    proc = subprocess.run([sys.executable, "launch/ablation.py", "--out", str(tmp_path / "out"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the driver end to end


def tiny_sets(data: dict, uri: str) -> list[str]:
    root = data["root"]
    return [f"data.train={root / 'train'}", f"data.val={root / 'val'}", f"data.test={root / 'test'}",
            f"data.relations={root / 'relations'}", f"data.tokenizer={data['tokenizer']}", "data.synthetic=null",
            "data.image_size=32", "data.max_text_len=48", "data.num_workers=0", "data.shuffle_buffer=16",
            TINY_MODEL, "model.pretrain_config=null", "train.steps=4", "train.micro_batch_size=4", "train.lr=1e-3",
            "train.warmup_steps=1",
            "train.log_every=1", "train.threads=1", "train.val_every=2", "finetune.negative_size=3",
            "finetune.hard_size=1", "finetune.pool_size=16", "finetune.iais.weight=1.0", "eval.score_batch=256",
            "eval.pictures=0", "checkpoint.export=false", f"tracking.tracking_uri={uri}",
            f"tracking.experiment_name={EXPERIMENT}"]


def run_driver(args: list[str], timeout: int = 900) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=os.environ.get(
                   "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "launch/ablation.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - start


def sabotage(run_dir: Path) -> None:
    """A complete checkpoint of another config in the run directory: the fine-tune stops at start-up (exit 2)."""
    tag = run_dir / "checkpoints" / "step0000002"
    tag.mkdir(parents=True)
    (tag / "relalign_complete.json").write_text(json.dumps({"step": 2, "world_size": 1, "config": {"seed": 99}}))


@pytest.fixture(scope="module")
def ablation(tiny_data, mlflow_server, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ablation") / "out"
    sabotage(out / "distributed" / "seed0")
    args = ["--config", str(CONFIG), "--variants", "none,distributed,singular", "--seed-list", "0",
            "--out", str(out)]
    for s in tiny_sets(tiny_data, mlflow_server):
        args += ["--set", s]
    proc, seconds = run_driver(args)
    return {"out": out, "args": args, "proc": proc, "seconds": seconds, "uri": mlflow_server}


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def children(uri: str, parent_id: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.mark.slow
def test_end_to_end_tables_plots_and_mlflow(ablation):
    proc, out = ablation["proc"], ablation["out"]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    md = (out / "results.md").read_text()
    assert md in proc.stdout                              # printed at the end
    assert "none (n=1/1)" in md and "singular (n=1/1)" in md and "config: `" in md and "torch " in md
    assert "| rsum (`rsum`) |" in md and "[n/a] (n=1)" in md   # one seed: a difference, no interval
    for run in ("none", "singular"):
        metrics = json.loads((out / run / "seed0" / "test_metrics.json").read_text())
        assert {m.key for m in METRICS} <= set(metrics), sorted(set(m.key for m in METRICS) - set(metrics))
        rows = [json.loads(line) for line in (out / run / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "val/isda" in r], run        # the ISDa curve has points
        assert (out / run / "seed0" / "ablation.log").is_file()
    with open(out / "results.csv", newline="") as f:
        rows = {(r["kind"], r["variant"], r["metric"]): r for r in csv.DictReader(f)}
    assert len({key for _, _, key in rows}) == len(METRICS)
    for run in ("none", "singular"):
        got = json.loads((out / run / "seed0" / "test_metrics.json").read_text())["rsum"]
        assert rows[("mean", run, "rsum")]["n"] == "1" and float(rows[("mean", run, "rsum")]["mean"]) == got
    diff = rows[("diff_vs_none", "singular", "rsum")]
    assert diff["n"] == "1" and diff["ci_low"] == "" and ("diff_vs_none", "none", "rsum") not in rows
    for png in ("isda_by_step.png", "group_score.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png

    client, parent_id = _client(ablation["uri"]), json.loads((out / "parent_run.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "ablation-ablation_tiny"
    assert {"results.md", "results.csv", "isda_by_step.png", "group_score.png"} <= \
        {a.path for a in client.list_artifacts(parent_id)}
    assert parent.data.metrics["none/rsum"] == float(rows[("mean", "none", "rsum")]["mean"])
    assert "singular_minus_none/rsum" in parent.data.metrics
    kids = children(ablation["uri"], parent_id)
    assert sorted(r.data.tags["ablation_variant"] for r in kids) == ["none", "singular"]
    assert all(r.info.status == "FINISHED" and r.data.tags["ablation_seed"] == "0" for r in kids)
    assert parent.data.tags["relalign.ablation"] == "parent"
    assert all(r.data.tags["relalign.ablation"] == "child" for r in kids)
    assert all(r.data.params["config.finetune.iais.alignment"] == r.data.tags["ablation_variant"] for r in kids)


@pytest.mark.slow
def test_crashed_variant_is_reported_and_the_next_one_still_runs(ablation):
    proc, out = ablation["proc"], ablation["out"]
    log = out / "distributed" / "seed0" / "ablation.log"
    assert "distributed seed 0 CRASHED (exit code 2)" in proc.stderr and str(log) in proc.stderr
    assert "trained with another config" in proc.stderr            # the log's last lines are shown
    assert proc.stdout.index("distributed seed 0: running") < proc.stdout.index("singular seed 0: running")
    assert "singular seed 0: done" in proc.stdout
    md = (out / "results.md").read_text()
    assert "distributed (n=0/1, 1 crashed)" in md and "| distributed | 0 | CRASHED |" in md
    assert not (out / "distributed" / "seed0" / "test_metrics.json").exists()


@pytest.mark.slow
def test_rerun_reuses_finished_runs_and_retries_only_the_crashed_one(ablation):
    out = ablation["out"]
    assert ablation["proc"].returncode == 0
    finished = [out / v / "seed0" / "test_metrics.json" for v in ("none", "singular")]
    mtimes = [p.stat().st_mtime_ns for p in finished]
    parent_before = json.loads((out / "parent_run.json").read_text())["run_id"]
    proc, seconds = run_driver(ablation["args"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for v in ("none", "singular"):
        assert f"{v} seed 0: finished, reusing" in proc.stdout
    assert "distributed seed 0: running" in proc.stdout and "distributed seed 0 CRASHED" in proc.stderr
    assert [p.stat().st_mtime_ns for p in finished] == mtimes
    assert seconds < ablation["seconds"] * 0.7, (seconds, ablation["seconds"])
    assert json.loads((out / "parent_run.json").read_text())["run_id"] == parent_before
    assert len(children(ablation["uri"], parent_before)) == 2
