"""Evaluation on a real (tiny) synthetic split: full vs pairwise scoring, two-stage, 2 gloo ranks, ISDa
positions, Winoground, and launch/evaluate.py as a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import create_model
from models.image_encoder import ImageTokens, box_features
from pipeline.data.eval_split import EvalData, object_boxes
from pipeline.errors import UserError
from pipeline.evaluation import (EvalConfig, evaluate, full_retrieval, isd_metrics, region_targets,
                                 resolve_quadruples, score_pairs, two_stage_recalls, two_stage_retrieval)
from pipeline.data.eval_split import load_eval_split
from pipeline.data.loader import LoaderConfig
from pipeline.evaluation.metrics import retrieval_recalls, winoground_scores
from pipeline.data.synthetic import SyntheticConfig, build_synthetic_dataset
from pipeline.data.tokenizer import SentencePieceTokenizer, iter_captions

REPO = Path(__file__).resolve().parent.parent
N_TEST = 8  # images in the test split (5 captions each)
N_QUADS = 3  # relation-swap quadruples in the relations split


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Synthetic dataset (8 test images), a tokenizer and a saved tiny model with it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaldata")
    synthetic = SyntheticConfig(train=8, val=2, test=N_TEST, relations=N_QUADS, image_size=64, shard_samples=3)
    build_synthetic_dataset(root, synthetic, progress=False)
    tok_path = root / "tok.model"
    SentencePieceTokenizer.train(iter_captions([str(root / "train"), str(root / "test")]), tok_path, 80)
    tok = SentencePieceTokenizer(tok_path)
    torch.manual_seed(0)
    model = create_model("tiny", vocab_size=tok.vocab_size, max_text_len=24,
                         image=dict(mode="patch", backbone="test_vit", image_size=64)).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    (model_dir / "tokenizer.model").write_bytes(tok_path.read_bytes())
    test = str(root / "test")
    data, relations = (load_eval_split(split, tok, LoaderConfig.for_model("test_vit", shards=split, image_size=64,
                                                                          max_text_len=24, num_workers=0))
                       for split in (test, str(root / "relations")))
    return {"root": root, "tok": tok, "model": model, "model_dir": model_dir, "data": data, "test": test,
            "relations": relations}


def cfg(**kw) -> EvalConfig:
    base = dict(score_batch=48, encode_batch=3, progress=False, pictures=0, isd_max_pairs=12, two_stage=True)
    base.update(kw)
    return EvalConfig(**base)


def count_calls(module: torch.nn.Module) -> list[int]:
    """[calls, rows] through module.forward, counted by a forward hook."""
    counter = [0, 0]

    def hook(_mod, args, _out):
        counter[0] += 1
        first = args[0]
        counter[1] += first["pixels"].shape[0] if isinstance(first, dict) else first.shape[0]

    module.register_forward_hook(hook)
    return counter


def test_split_is_read_with_annotations_and_quadruples(assets):
    data = assets["data"]
    assert data.n_images == N_TEST and data.n_texts == 5 * N_TEST
    assert data.has_annotations and not data.quadruples          # the retrieval test split is plain
    assert len(assets["relations"].quadruples) == N_QUADS
    assert data.object_centres is not None and float(data.object_centres[0].min()) >= 0
    assert data.object_boxes is not None and len(data.object_boxes) == N_TEST
    boxes = data.object_boxes[0]
    assert boxes.shape == (data.object_centres[0].shape[0], 4)
    assert 0 <= float(boxes.min()) <= float(boxes.max()) <= 1
    torch.testing.assert_close((boxes[:, :2] + boxes[:, 2:]) / 2, data.object_centres[0])
    assert len(data.subset(max_images=3).object_boxes) == 3


def test_full_retrieval_equals_pairwise_scores_and_encodes_each_image_once(assets):
    model, data = assets["model"], assets["data"]
    model = create_model(model.config).eval()
    model.load_state_dict(assets["model"].state_dict())
    enc = count_calls(model.image_encoder)
    with torch.no_grad():
        scores, stats = full_retrieval(model, data, cfg())
        assert enc[1] == data.n_images  # backbone once per image, not per pair
        enc[1] = 0
        blocked, _ = full_retrieval(model, data, cfg(image_block=3))   # tokens of 3 images held at a time
        assert enc[1] == data.n_images
        torch.testing.assert_close(blocked, scores, atol=1e-5, rtol=1e-5)
        caps = torch.tensor([0, 7, 23, 39])
        for c in caps.tolist():
            batch = {k: v for k, v in data.text_inputs(torch.tensor([c])).items()}
            batch.update(data.image_inputs(torch.arange(data.n_images)))
            direct = model.score({k: v.expand(data.n_images, -1) if k.startswith(("input", "text")) else v
                                  for k, v in batch.items()})
            torch.testing.assert_close(scores[c], direct, atol=1e-5, rtol=1e-5)
    assert scores.shape == (data.n_texts, data.n_images) and stats["full_pairs_per_s"] > 0


def test_two_stage_covering_everything_equals_full_exactly(assets):
    model, data = assets["model"], assets["data"]
    with torch.no_grad():
        full, _ = full_retrieval(model, data, cfg())
        t2i, i2t, stats = two_stage_retrieval(model, data, cfg(two_stage_k=data.n_images,
                                                               two_stage_k_texts=data.n_texts))
        assert torch.equal(t2i, full) and torch.equal(i2t, full)
        assert two_stage_recalls(t2i, i2t, data.text_to_image) == retrieval_recalls(full, data.text_to_image)
        # k = n_images alone: every text query sees every image -> image retrieval is exactly full
        t2i_k, i2t_k, _ = two_stage_retrieval(model, data, cfg(two_stage_k=data.n_images))
        assert torch.equal(t2i_k, full)
    assert stats["two_stage_itc_seconds"] >= 0 and stats["two_stage_rerank_seconds"] >= 0


def test_two_stage_shortlist_has_k_candidates_per_query(assets):
    model, data = assets["model"], assets["data"]
    with torch.no_grad():
        full, _ = full_retrieval(model, data, cfg())
        t2i, i2t, stats = two_stage_retrieval(model, data, cfg(two_stage_k=3, two_stage_k_texts=4))
    assert (torch.isfinite(t2i).sum(1) == 3).all() and (torch.isfinite(i2t).sum(0) == 4).all()
    finite = torch.isfinite(t2i)
    torch.testing.assert_close(t2i[finite], full[finite], atol=1e-5, rtol=1e-5)
    assert stats["two_stage_pairs"] < data.n_texts * data.n_images


def test_region_targets_map_objects_to_sequence_positions():
    ids = [[2, 10, 11, 12, 3], [2, 13, 3]]
    data = EvalData(["a", "b"], {"pixels": torch.zeros(2, 3, 8, 8)}, ids, [0, 1],
                    token_objects=[[-1, 1, -1, 0, -1], [-1, 2, -1]],
                    object_centres=[torch.tensor([[0.1, 0.1], [0.9, 0.6]]), torch.tensor([[0.5, 0.5]] * 3)])
    # 2x2 patch grid, row-major
    cells = torch.tensor([[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]])
    pos = torch.cat([cells, torch.zeros(4, 3)], dim=1).expand(2, -1, -1)
    tokens = ImageTokens(torch.zeros(2, 4, 1), pos, torch.ones(2, 4, dtype=torch.bool))
    caps = torch.tensor([0, 1])
    patch = region_targets(data, caps, tokens, text_len=5, mode="patch")
    assert patch.shape == (2, 9)
    assert patch[0].tolist() == [-1, 5 + 3, -1, 5 + 0, -1, -1, -1, -1, -1]
    assert patch[1, :3].tolist() == [-1, 5 + 3, -1]  # centre (0.5, 0.5) lies in the lower-right cell
    region = region_targets(data, caps, tokens, text_len=5, mode="roi")
    assert region[0].tolist() == [-1, 5 + 1, -1, 5 + 0, -1, -1, -1, -1, -1]
    assert region[1, 1].item() == 5 + 2


def _box_tokens(boxes: list[list[float]], real: int) -> ImageTokens:
    pos = box_features(torch.tensor(boxes), 1.0, 1.0)
    mask = torch.arange(len(boxes)) < real
    return ImageTokens(torch.zeros(1, len(boxes), 1), pos[None], mask[None])


def test_features_mode_matches_objects_to_regions_by_iou():
    # objects (pixels of a 200 x 100 image): 0 = region 2 exactly, 1 = mostly region 0 (IoU 0.8), 2 overlaps
    # nothing well (best IoU 0.3), 3 = only the padded region 3, 4 has no box
    objects = [{"box": [100, 50, 200, 100]}, {"box": [0, 0, 80, 50]}, {"box": [100, 0, 130, 50]},
               {"box": [0, 50, 100, 100]}, {"name": "no box"}]
    boxes = object_boxes(objects, (200, 100))
    torch.testing.assert_close(boxes[0], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert boxes[4].tolist() == [-1, -1, -1, -1]
    tokens = _box_tokens([[0, 0, .5, .5], [.5, 0, 1, .5], [.5, .5, 1, 1], [0, .5, .5, 1]], real=3)
    ids = [[2, 10, 11, 12, 13, 14, 15, 3]]
    data = EvalData(["a"], {"region_feat": torch.zeros(1, 4, 1)}, ids, [0],
                    token_objects=[[-1, 0, 1, 2, 3, 4, 0, -1]], object_boxes=[boxes])
    got = region_targets(data, torch.tensor([0]), tokens, text_len=8, mode="features")
    assert got.shape == (1, 12)
    # words of objects 0 and 1 -> regions 2 and 0; objects 2, 3, 4 unmatched; two words share region 2
    assert got[0, :8].tolist() == [-1, 8 + 2, 8 + 0, -1, -1, -1, 8 + 2, -1]
    # without boxes nothing is matched (no identity guess)
    bare = EvalData(["a"], {"region_feat": torch.zeros(1, 4, 1)}, ids, [0], token_objects=data.token_objects)
    assert (region_targets(bare, torch.tensor([0]), tokens, text_len=8, mode="features") == -1).all()


def test_isd_metrics_in_features_mode_count_matched_words(assets):
    # a tiny features-mode model on hand-made regions: image 0's regions are its objects' boxes in reverse
    # order (an identity mapping would pair every word with the wrong region), image 1's match nothing
    torch.manual_seed(0)
    tok = assets["tok"]
    model = create_model("tiny", vocab_size=tok.vocab_size, max_text_len=24,
                         image=dict(mode="features", feat_dim=8)).eval()
    objects = torch.tensor([[0, 0, .5, .5], [.5, .5, 1, 1], [0, .5, .25, 1]])
    regions = torch.stack([objects.flip(0), torch.tensor([[.6, 0, .7, .1]] * 3)])
    images = {"region_feat": torch.randn(2, 3, 8), "region_pos": box_features(regions, 1.0, 1.0),
              "region_mask": torch.ones(2, 3, dtype=torch.bool)}
    ids = [[2, 10, 11, 12, 3], [2, 13, 14, 3]]
    data = EvalData(["a", "b"], images, ids, [0, 1], token_objects=[[-1, 0, 1, 2, -1], [-1, 0, 1, -1]],
                    object_boxes=[objects, objects[:2]])
    with torch.no_grad():
        m = isd_metrics(model, data, cfg(isd_max_pairs=None))
    assert (m["isda_words"], m["isda_words_annotated"], m["isda_pairs"]) == (3.0, 5.0, 1.0)
    tokens = model.encode_image(data.image_inputs(torch.tensor([0])))
    targets = region_targets(data, torch.tensor([0]), tokens, text_len=5, mode="features")
    assert targets[0, :5].tolist() == [-1, 5 + 2, 5 + 1, 5 + 0, -1]
    assert m["isda"] >= 0 and 0 <= m["grounding_acc"] <= 100


def test_winoground_and_isd_through_evaluate(assets):
    model, data = assets["model"], assets["relations"]
    result = evaluate(model, data, cfg(full=True, two_stage=False))
    m = result.metrics
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "rsum", "isda", "isda_words",
                "isda_words_annotated", "grounding_acc", "wino_text", "wino_image", "wino_group",
                "full_seconds", "full_pairs_per_s"):
        assert key in m, key
    for a in ("singular", "distributed", "congruence"):
        for side in ("L", "V"):
            assert m[f"isd_{a}_{side}"] >= 0
    assert 0 < m["isda_words"] <= m["isda_words_annotated"] and 0 <= m["grounding_acc"] <= 100
    assert m["isda"] >= 0 and m["isda_pairs"] > 0
    # Winoground from the model's own pair scores, computed here directly
    s = torch.zeros(len(data.quadruples), 2, 2)
    with torch.no_grad():
        for q, (i0, c0, i1, c1) in enumerate(data.quadruples):
            for i, c in enumerate((c0, c1)):
                for j, img in enumerate((i0, i1)):
                    s[q, i, j] = result.scores[c, img]
    w = winoground_scores(s)
    assert (m["wino_text"], m["wino_image"], m["wino_group"]) == (w["text"], w["image"], w["group"])
    assert model.training is False


def test_user_quadruples_resolve_and_reject_unknown_keys(assets):
    data, tok = assets["data"], assets["tok"]
    key0, key1 = data.image_keys[0], data.image_keys[1]
    entries = [{"image0": key0, "caption0": data.captions[0], "image1": key1,
                "caption1": "a brand new caption"}]
    extended, quads = resolve_quadruples(data, entries, tok, 24)
    assert quads[0][1] == 0 and quads[0][3] == data.n_texts
    assert extended.n_texts == data.n_texts + 1 and data.n_texts == 5 * N_TEST
    with pytest.raises(UserError, match="image1"):
        resolve_quadruples(data, [dict(entries[0], image1="no-such-key")], tok, 24)
    scores = score_pairs(assets["model"], extended, torch.tensor([[quads[0][3], 1]]), cfg())
    assert torch.isfinite(scores).all()


# ----------------------------------------------------------------------------- two real gloo ranks

def _rank_worker(rank: int, world: int, init_file: str, model_dir: str, data: EvalData, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from models import RetrievalModel
    model = RetrievalModel.from_pretrained(model_dir).eval()
    enc, fwd = count_calls(model.image_encoder), count_calls(model.encoder)
    result = evaluate(model, data, cfg(two_stage_k=3))
    calls = (enc[0], fwd[0])
    enc[0] = fwd[0] = 0
    with torch.no_grad():   # 7 images in blocks of 3: rank 0 holds 3 + 1, rank 1 holds 3 and pads with dummy calls
        uneven, _ = full_retrieval(model, data.subset(max_images=7), cfg(image_block=3))
    torch.save({"metrics": result.metrics, "scores": result.scores, "t2i": result.two_stage_scores[0],
                "calls": calls, "uneven": uneven, "uneven_calls": (enc[0], fwd[0])}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_rank(assets, tmp_path):
    data, model_dir = assets["data"], str(assets["model_dir"])
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), model_dir, data, str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # the same number of collective forwards on both ranks (ZeRO-3 safe), also with an uneven split
    assert r0["calls"] == r1["calls"] and r0["uneven_calls"] == r1["uneven_calls"]
    single = evaluate(assets["model"], data, cfg(two_stage_k=3))
    torch.testing.assert_close(r0["scores"], single.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(r0["scores"], r1["scores"])
    torch.testing.assert_close(r0["t2i"], single.two_stage_scores[0], atol=1e-5, rtol=1e-5)
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "rsum", "two_stage_rsum"):
        assert r0["metrics"][key] == single.metrics[key], key
    for key in ("isd_singular_L", "isd_congruence_V", "isda"):
        assert r0["metrics"][key] == pytest.approx(single.metrics[key], rel=1e-4, abs=1e-7)
    with torch.no_grad():
        uneven, _ = full_retrieval(assets["model"], data.subset(max_images=7), cfg())
    assert uneven.shape == (35, 7) and torch.equal(r0["uneven"], r1["uneven"])
    torch.testing.assert_close(r0["uneven"], uneven, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- CLI

def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_with_mlflow(assets, tmp_path):
    data = assets["data"]
    quads = tmp_path / "quads.json"
    quads.write_text(json.dumps([{"image0": data.image_keys[0], "caption0": data.captions[0],
                                  "image1": data.image_keys[1], "caption1": "a caption that is not there"}]))
    out = tmp_path / "out"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("MLFLOW_RUN_ID", None)
    proc = _cli("--model", str(assets["model_dir"]), "--shards", assets["test"], "--out", str(out),
                "--quadruples", str(quads), "--k", "4", "--pictures", "2", "--threads", "1", "--quiet",
                "--score-batch", "64", "--mlflow", "--experiment", "eval-test", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]
    assert results["images"] == N_TEST and m["wino_quadruples"] == 1.0
    assert {"txt_r1", "img_r10", "rsum", "two_stage_img_r1", "isd_singular_L", "isda", "wino_group"} <= set(m)
    assert "| full |" in proc.stdout and "| two-stage |" in proc.stdout
    pngs = sorted(p.name for p in (out / "pictures").glob("*.png"))
    assert {"attention_00.png", "top5_text_query_00.png", "top5_image_query_01.png"} <= set(pngs)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("eval-test")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.data.metrics["eval/rsum"] == pytest.approx(m["rsum"])


def test_cli_loads_a_deepspeed_stage0_checkpoint_and_reports_bad_input(assets, tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step0000010").mkdir(parents=True)
    torch.save({"module": assets["model"].state_dict()}, ckpt / "step0000010" / "mp_rank_00_model_states.pt")
    (ckpt / "latest").write_text("step0000010")
    (tmp_path / "config.json").write_text((assets["model_dir"] / "config.json").read_text())
    tok = str(assets["model_dir"] / "tokenizer.model")
    out = tmp_path / "out"
    proc = _cli("--model", str(ckpt), "--shards", assets["test"], "--out", str(out), "--tokenizer", tok,
                "--no-two-stage", "--no-isd", "--no-winoground", "--pictures", "0", "--threads", "1",
                "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rsum" in json.loads((out / "results.json").read_text())["metrics"]
    bad = _cli("--model", str(ckpt), "--shards", str(tmp_path / "missing"), "--tokenizer", tok, "--quiet")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "missing" in bad.stderr
    with pytest.raises(UserError, match="two_stage_k"):
        EvalConfig(two_stage_k=0)


@pytest.mark.slow
def test_cli_under_the_deepspeed_launcher_matches_plain_python(assets, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--model", str(assets["model_dir"]), "--shards", assets["test"], "--k", "3", "--pictures", "0",
              "--threads", "1", "--quiet", "--score-batch", "64", "--relations", str(assets["root"] / "relations")]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    launched = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                               str(port), "launch/evaluate.py", *common, "--out", str(tmp_path / "ds")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, (launched.stdout + launched.stderr)[-3000:]
    plain = _cli(*common, "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    two = json.loads((tmp_path / "ds" / "results.json").read_text())
    one = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "rsum", "two_stage_rsum", "wino_text", "wino_group"):
        assert two["metrics"][key] == one["metrics"][key], key
    assert two["metrics"]["isd_singular_L"] == pytest.approx(one["metrics"]["isd_singular_L"], rel=1e-4)
