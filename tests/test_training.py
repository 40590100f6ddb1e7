"""Training stages end to end: 2-rank CPU runs (gloo) under the real `deepspeed` launcher with ZeRO 2 / 3,
IAIS on, logging to a real MLflow server; exact resume; the consolidated ZeRO-3 export.

One tiny synthetic dataset (32 px scenes) and one tokenizer are built once per session and shared."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).parent / "deepspeed"

TINY_MODEL = ("model.overrides={hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, "
              "itc_dim: 16, dropout: 0.0, init_std: 0.1}")


def common_sets(tiny_data: dict, run_dir: Path, uri: str | None, steps: int = 4) -> list[str]:
    root = tiny_data["root"]
    sets = [f"data.train={root / 'train'}", f"data.val={root / 'val'}", f"data.test={root / 'test'}",
            f"data.relations={root / 'relations'}",
            f"data.tokenizer={tiny_data['tokenizer']}", "data.synthetic=null", "data.image_size=32",
            "data.max_text_len=48", "data.num_workers=0", "data.shuffle_buffer=16", TINY_MODEL,
            "model.pretrain_config=null", "eval.full=true", "finetune.swap_negatives=false",
            "finetune.grounding_weight=0.0",
            f"run_dir={run_dir}", f"train.steps={steps}", "train.micro_batch_size=4", "train.lr=1e-3",
            "train.warmup_steps=1", "train.log_every=1", "train.threads=1",
            "finetune.negative_size=3", "finetune.hard_size=1", "finetune.pool_size=16",
            "finetune.iais.weight=1.0", "finetune.iais.schedule=const", "eval.score_batch=256",
            "eval.pictures=0",   # matplotlib: ~5 s a run; the tests that check pictures ask for them
            "tracking.experiment_name=pytest-training"]
    if uri is None:
        sets.append("tracking.enabled=false")
    else:
        sets.append(f"tracking.tracking_uri={uri}")
    return sets


def launch(stage: str, zero: str, sets: list[str], nprocs: int = 2, timeout: int = 400, config=None) -> str:
    ds_config = zero if zero.endswith(".json") else f"ds_configs/{zero}.json"
    cmd = [str(DEEPSPEED), "--num_gpus", str(nprocs), "--master_port", str(_free_port()),
           f"launch/{stage}.py", "--deepspeed_config", ds_config] + (["--config", str(config)] if config else [])
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=os.environ.get(
                   "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_run(uri: str, run_dir: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("pytest-training")
    runs = client.search_runs([exp.experiment_id], filter_string=f"params.`config.run_dir` = '{run_dir}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# ----------------------------------------------------------------------------- multi-process runs

@pytest.mark.slow
def test_finetune_zero2_two_ranks_logs_to_mlflow(tiny_data, mlflow_server, tmp_path):
    run_dir = tmp_path / "ft_zero2"
    sets = common_sets(tiny_data, run_dir, mlflow_server) + ["train.val_every=2", "eval.pictures=1"]
    out = launch("finetune", "zero2", sets)
    # the output is not a terminal: one plain progress line per logging window, no bar redraws
    assert "[finetune] step 4/4 loss=" in out and "step/s]" not in out
    client, run = mlflow_run(mlflow_server, run_dir)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in ("loss", "rank_loss", "iais_loss", "iais_weight", "lr", "grad_norm", "samples_per_s",
                "rank_loss_t2i", "rank_loss_i2t"):
        assert key in m and math.isfinite(m[key]), key
    assert m["iais_loss"] > 0
    for prefix in ("val/", "test/"):
        for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "rsum",
                    "isd_singular_L", "isd_singular_V", "isd_distributed_L", "isd_congruence_V"):
            assert prefix + key in m and math.isfinite(m[prefix + key]), prefix + key
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(h.step for h in history) == [1, 2, 3, 4]
    p = run.data.params
    assert p["world_size"] == "2" and p["node_count"] == "1" and p["hostnames"]
    assert p["ds.zero_optimization.stage"] == "2" and p["config.finetune.iais.alignment"] == "singular"
    assert "version.deepspeed" in p
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert list((run_dir / "pictures" / "test").glob("attention_*.png"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"configs", "pictures"} <= artifacts, artifacts
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1 and models[0].status == "READY"   # the export is the run's logged model
    assert {a.path for a in client.list_logged_model_artifacts(models[0].model_id)} >= {"model.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("paper", ["flickr30k_base", "coco_base"])
def test_paper_config_finetune_section_trains_from_step_0(paper, tiny_data, tmp_path):
    """The paper's fine-tune section as shipped (micro-batch 8, 399 candidates per anchor, 31 kept, pool 4096,
    both directions) on the tiny model: the pool is filled before step 0, so mining works from the first step."""
    run_dir = tmp_path / paper
    sets = [s for s in common_sets(tiny_data, run_dir, None, steps=2)
            if s.split("=")[0] not in ("train.micro_batch_size", "train.lr") and not s.startswith("finetune.")]
    launch("finetune", "zero2", [*sets, "data.image_mode=patch", "model.preset=tiny", "model.init=null",
                                 "data.vocab_size=100", "train.val_every=0", "eval.test=false",
                                 "checkpoint.export=false", "checkpoint.every=0", "train.threads=2"],
           nprocs=1, config=REPO / "launch" / "configs" / f"{paper}.yaml")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["pairs_scored"] == 2 * 8 * 399 and r["pairs_trained"] == 8 + 2 * 8 * 31
        assert math.isfinite(r["rank_loss_t2i"]) and math.isfinite(r["rank_loss_i2t"]) and r["iais_loss"] > 0


@pytest.mark.slow
def test_finetune_zero3_export_loads_without_deepspeed_and_scores_the_same(tiny_data, tmp_path):
    run_dir = tmp_path / "ft_zero3"
    launch("finetune", "zero3", common_sets(tiny_data, run_dir, None, steps=3)
           + ["finetune.iais.alignment=distributed", "finetune.iais.side=both", "finetune.itc_weight=0.5",
              "finetune.itc_preselect=6", "eval.two_stage=true", "eval.two_stage_k=3"])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["itc_loss"]) and r["itc_loss"] > 0 for r in logged if "loss" in r)
    live = json.loads((run_dir / "test_metrics.json").read_text())
    code = (
        "import json, sys, torch\n"
        "from models import RetrievalModel\n"
        "from pipeline.data.tokenizer import load_tokenizer\n"
        "from pipeline.data.loader import LoaderConfig, image_norm_for\n"
        "from pipeline.data.eval_split import load_eval_split\n"
        "from pipeline.evaluation import EvalConfig, evaluate\n"
        "assert 'deepspeed' not in sys.modules\n"
        f"d = '{run_dir / 'model'}'\n"
        "m = RetrievalModel.from_pretrained(d)\n"
        "tok = load_tokenizer(d + '/tokenizer.model')\n"
        "mean, std, interp = image_norm_for(m.config.image.backbone)\n"
        f"cfg = LoaderConfig(shards='{tiny_data['root'] / 'test'}', batch_size=1, image_size=32, mean=mean, "
        "std=std, interpolation=interp, max_text_len=48)\n"
        f"split = load_eval_split('{tiny_data['root'] / 'test'}', tok, cfg)\n"
        "torch.set_num_threads(1)\n"
        "cfg = EvalConfig(score_batch=256, two_stage=True, two_stage_k=3, progress=False)\n"
        "metrics = evaluate(m, split, cfg).metrics\n"
        "from pipeline.evaluation.evaluate import winoground_on_split\n"
        f"relations = load_eval_split('{tiny_data['root'] / 'relations'}', tok, cfg=LoaderConfig(shards='', "
        "batch_size=1, image_size=32, mean=mean, std=std, interpolation=interp, max_text_len=48))\n"
        "metrics.update(winoground_on_split(m, relations, cfg))\n"
        "print(json.dumps(metrics))\n"
        "assert 'deepspeed' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "rsum",
                "two_stage_txt_r1", "two_stage_img_r1", "two_stage_rsum"):
        assert exported[key] == live[key], key
    for key in ("isd_singular_L", "isd_singular_V", "isd_distributed_L", "wino_text", "wino_group"):
        assert exported[key] == pytest.approx(live[key], rel=1e-4, abs=1e-6), key
    # the partitioned ZeRO-3 checkpoint itself, consolidated by launch/evaluate.py (config and tokenizer found
    # in the run's model/ directory)
    out = tmp_path / "eval_ckpt"
    proc = subprocess.run([sys.executable, "launch/evaluate.py", "--model", str(run_dir / "checkpoints"),
                           "--shards", str(tiny_data["root"] / "test"), "--out", str(out), "--no-two-stage",
                           "--pictures", "0", "--threads", "1", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_checkpoint = json.loads((out / "results.json").read_text())["metrics"]
    for key in ("txt_r1", "txt_r10", "img_r1", "img_r10", "rsum"):
        assert from_checkpoint[key] == live[key], key


@pytest.mark.slow
def test_pretrain_zero3_two_ranks_logs_task_losses(tiny_data, mlflow_server, tmp_path):
    run_dir = tmp_path / "pt_zero3"
    sets = common_sets(tiny_data, run_dir, mlflow_server, steps=6) + [
        "pretrain.tasks={mlm: 1.0, itm: 1.0, itc: 1.0}"]
    launch("pretrain", "zero3", sets)
    client, run = mlflow_run(mlflow_server, run_dir)
    m = run.data.metrics
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "mlm_loss", "itm_loss", "itc_loss"):
        assert key in m and math.isfinite(m[key]), key
    from models import RetrievalModel
    model = RetrievalModel.from_pretrained(run_dir / "model")
    assert (run_dir / "model" / "tokenizer.model").is_file() and model.config.hidden_size == 32


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero3_offload"])
def test_every_shipped_zero_config_trains_and_exports(tiny_data, tmp_path, zero):
    run_dir = tmp_path / zero
    launch("finetune", zero, common_sets(tiny_data, run_dir, None, steps=2) + ["eval.test=false"], nprocs=1)
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    stage = json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"]
    assert stage == int(zero[4])
    from models import RetrievalModel
    model = RetrievalModel.from_pretrained(run_dir / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_pretrain_in_roi_mode_runs_mrfr(tiny_data, tmp_path):
    run_dir = tmp_path / "pt_roi"
    roi_model = TINY_MODEL.replace("init_std: 0.1}", "init_std: 0.1, image: {backbone: test_resnet}}")
    sets = [s for s in common_sets(tiny_data, run_dir, None, steps=4) if s != TINY_MODEL] + [
        roi_model, "data.image_mode=roi", "data.max_regions=4", "pretrain.tasks={mlm: 0.0, itm: 1.0, mrfr: 1.0}"]
    launch("pretrain", "zero2", sets, nprocs=1)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mrfr = [r["mrfr_loss"] for r in rows if "mrfr_loss" in r]
    assert mrfr and all(math.isfinite(v) and v > 0 for v in mrfr)
    assert all(r["grad_norm"] < 1e3 for r in rows)   # masked regions once made it ~1e5 (zero input under LN)
    from models import RetrievalModel
    assert RetrievalModel.from_pretrained(run_dir / "model").config.image.mode == "roi"


def _karpathy_with_features(root: Path, feat_dim: int) -> Path:
    """A Karpathy-format dataset (24 train / 6 val / 6 test images, 2 captions each) with one region-feature
    .npz per image, turned into shards by the real make_shards CLI."""
    import numpy as np
    from PIL import Image
    colours = {"red": (200, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 200), "yellow": (220, 220, 20)}
    shapes = ("square", "circle", "triangle")
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "feats").mkdir()
    entries = []
    for k in range(36):
        colour, shape = list(colours)[k % 4], shapes[k % 3]
        Image.new("RGB", (40, 30), colours[colour]).save(root / "images" / f"im{k}.jpg")
        np.savez(root / "feats" / f"im{k}.npz", features=rng.normal(size=(3, feat_dim)).astype(np.float32),
                 boxes=np.array([[0, 0, 20, 15], [20, 0, 40, 15], [5, 10, 35, 30]], np.float32),
                 image_size=np.array([40, 30]))
        split = "train" if k < 24 else ("val" if k < 30 else "test")
        entries.append({"filename": f"im{k}.jpg", "split": split,
                        "sentences": [{"raw": f"a {colour} {shape} on a plain background"},
                                      {"raw": f"the {shape} is {colour} number {k}"}]})
    (root / "karpathy.json").write_text(json.dumps({"images": entries}))
    proc = subprocess.run([sys.executable, "launch/make_shards.py", "karpathy", "--json", str(root / "karpathy.json"),
                           "--images", str(root / "images"), "--features", str(root / "feats"),
                           "--out", str(root / "shards"), "--max-samples", "8", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "shards"


@pytest.mark.slow
def test_region_features_from_karpathy_shards_finetune_and_evaluate(tmp_path):
    shards = _karpathy_with_features(tmp_path / "data", feat_dim=16)
    run_dir = tmp_path / "ft_features"
    model = TINY_MODEL.replace("init_std: 0.1}", "init_std: 0.1, image: {feat_dim: 16, backbone: null}}")
    sets = [f"data.root={shards}", "data.synthetic=null", "data.image_mode=features", "data.max_regions=3",
            "data.vocab_size=60", "data.max_text_len=24", "data.num_workers=0", "data.shuffle_buffer=8", model,
            f"run_dir={run_dir}", "train.steps=3", "train.micro_batch_size=4", "train.warmup_steps=1",
            "train.log_every=1", "train.threads=1", "finetune.negative_size=3", "finetune.hard_size=1",
            "finetune.pool_size=16", "tracking.enabled=false", "eval.two_stage=true", "eval.two_stage_k=2",
            "model.pretrain_config=null", "eval.full=true", "finetune.grounding_weight=0.0"]
    launch("finetune", "zero2", sets, nprocs=1)
    live = json.loads((run_dir / "test_metrics.json").read_text())
    assert {"rsum", "two_stage_rsum", "isd_singular_L"} <= set(live)
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "launch/evaluate.py", "--model", str(run_dir / "model"), "--shards",
                           str(shards / "test"), "--max-regions", "3", "--k", "2", "--out", str(out),
                           "--pictures", "1", "--threads", "1", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 6 and results["captions"] == 12
    for key in ("txt_r1", "img_r5", "rsum", "two_stage_rsum"):
        assert results["metrics"][key] == live[key], key
    assert list((out / "pictures").glob("top5_text_query_*.png"))


@pytest.mark.slow
def test_pretrain_mixes_weighted_sources_with_gradient_accumulation(tiny_data, tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["gradient_accumulation_steps"] = 2
    (tmp_path / "zero2_accum2.json").write_text(json.dumps(ds))
    run_dir, root = tmp_path / "pt_sources", tiny_data["root"]
    sets = common_sets(tiny_data, run_dir, None, steps=4) + [
        "pretrain.tasks={mlm: 1.0, itm: 1.0, itc: 0.0}", "checkpoint.export=false",
        f"pretrain.sources=[{{shards: {root / 'train'}, weight: 1.0}}, {{shards: {root / 'val'}, weight: 3.0}}]"]
    launch("pretrain", str(tmp_path / "zero2_accum2.json"), sets, nprocs=1)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    client = torch.load(run_dir / "checkpoints" / "step0000004" / "relalign_rank0.pt", weights_only=False)
    # batches each source has served: val holds 12 images = 3 batches of 4 per epoch, train 48
    served = [state["epoch"] * per_epoch + state["batches"] for state, per_epoch in zip(client["loader"], (48, 3))]
    assert sum(served) == 4 * 2 and min(served) >= 1, client["loader"]   # 4 steps x 2 micro-batches


@pytest.mark.slow
def test_finetune_api_with_gradient_accumulation_returns_the_test_metrics(tiny_data, tmp_path):
    """`finetune(cfg, ds)` in one single-rank process (the environment a launcher would set), no CLI: it
    returns the test metrics it wrote; two micro-batches per step go through the real engine."""
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["gradient_accumulation_steps"] = "auto"
    (tmp_path / "zero2_auto.json").write_text(json.dumps(ds))
    run_dir = tmp_path / "ft_api"
    sets = common_sets(tiny_data, run_dir, None, steps=2) + ["train.grad_accum=2", "checkpoint.export=false"]
    code = ("import json, sys\n"
            "from pipeline.train.runtime import prepare\n"
            "from pipeline.train.finetune import finetune\n"
            "cfg, ds = prepare('finetune', sys.argv[1], sys.argv[3:], sys.argv[2])\n"
            "print('METRICS ' + json.dumps(finetune(cfg, ds)))\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=os.environ.get(
                   "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "launch" / "configs" / "demo_tiny.yaml"),
                           str(tmp_path / "zero2_auto.json"), *sets],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("METRICS ")][-1]
    metrics = json.loads(line[len("METRICS "):])
    assert metrics == json.loads((run_dir / "test_metrics.json").read_text())
    assert {"txt_r1", "img_r1", "rsum", "isd_singular_L"} <= set(metrics)
    assert json.loads((run_dir / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def _pretrain_yaml(tiny_data: dict, run_dir: Path, path: Path, steps: int) -> Path:
    """A pretraining config file for the fine-tuning stage test: the tiny sets + grounding, WRA and swaps, with
    the main job's BCE ITM and attention-free MSE grounding."""
    import yaml
    from pipeline.config import apply_override
    raw: dict = {}
    for s in common_sets(tiny_data, run_dir, None, steps=steps) + [
            "pretrain.tasks={mlm: 0.5, itm: 1.0, itc: 0.5, wra: 0.5, grounding: 1.0}", "pretrain.swap_negatives=true",
            "pretrain.task_mix=sum", "pretrain.itm_loss=bce", "grounding.attention_weight=0",
            "grounding.regression=mse", "model.pretrain_config=null", "name=stage_pre"]:
        apply_override(raw, s)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_finetune_runs_its_pretraining_stage_once_and_reuses_it(tiny_data, tmp_path):
    """model.pretrain_config: the first fine-tune pretrains (grounding, WRA, swap negatives) and initialises from
    the export; a second fine-tune reuses it; a changed pretraining config is not silently reused."""
    pre_dir = tmp_path / "pre"
    pre_yaml = _pretrain_yaml(tiny_data, pre_dir, tmp_path / "pre.yaml", steps=6)
    sets = [s for s in common_sets(tiny_data, tmp_path / "ft1", None, steps=2) if not s.startswith("model.")] + [
        TINY_MODEL, f"model.pretrain_config={pre_yaml}", "finetune.swap_negatives=true",
        "finetune.grounding_weight=0.5"]
    out = launch("finetune", "zero2", sets, nprocs=1)
    assert "pretraining into" in out and "reusing" not in out, out[-3000:]
    rows = [json.loads(line) for line in (pre_dir / "metrics.jsonl").read_text().splitlines()]
    task_keys = {"mlm_loss", "itm_loss", "itc_loss", "wra_loss", "grounding_loss", "centre_acc", "itm_acc"}
    logged = [r for r in rows if "loss" in r]
    assert len(logged) == 6 and all(task_keys <= set(r) for r in logged), logged   # task_mix sum: all, every step
    assert json.loads((tmp_path / "ft1" / "test_metrics.json").read_text())["rsum"] >= 0
    saved = yaml_of(tmp_path / "ft1" / "experiment.yaml")
    assert saved["model"]["init"] == str(pre_dir / "model")
    ft_rows = [json.loads(line) for line in (tmp_path / "ft1" / "metrics.jsonl").read_text().splitlines()]
    assert any("rank_loss_swap" in r and "grounding_loss" in r for r in ft_rows)
    mtime = (pre_dir / "model" / "model.safetensors").stat().st_mtime
    out = launch("finetune", "zero2", [s.replace("ft1", "ft2") for s in sets], nprocs=1)
    assert "reusing" in out and "pretraining into" not in out, out[-3000:]
    assert (pre_dir / "model" / "model.safetensors").stat().st_mtime == mtime
    # a changed pretraining config is not reused: the stage is pretrained again (like a changed data config)
    _pretrain_yaml(tiny_data, pre_dir, pre_yaml, steps=8)
    out = launch("finetune", "zero2", [s.replace("ft1", "ft3") for s in sets], nprocs=1)
    assert "pretraining into" in out and "reusing" not in out, out[-3000:]
    assert (pre_dir / "model" / "model.safetensors").stat().st_mtime > mtime
    rows = [json.loads(line) for line in (pre_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "loss" in r) == 8


def yaml_of(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text())
