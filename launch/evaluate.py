#!/usr/bin/env python
"""relalign evaluation: full and two-stage retrieval recall, ISD/ISDa, Winoground scores, pictures.

    python launch/evaluate.py --model runs/demo_tiny/model [--shards DIR] [--out DIR] [...]
    deepspeed --num_gpus 2 launch/evaluate.py --model DIR ...     (work split across the ranks)

--model is a save_pretrained directory (config.json + model.safetensors, usually with tokenizer.model)
or a DeepSpeed checkpoint directory (holding `latest`; give --model-config unless a config.json sits
in it or its parent). Without --shards the embedded demo's synthetic test split is used (built on
first use). Results: <out>/results.json, a printed table, PNG pictures in <out>/pictures, and MLflow
metrics when a run is active (--mlflow-run-id or $MLFLOW_RUN_ID continues a run, --mlflow starts one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # runnable from a plain checkout too

from pipeline.errors import UserError, exit_code_of  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "launch" / "configs" / "demo_tiny.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="save_pretrained directory or DeepSpeed checkpoint directory")
    p.add_argument("--model-config", help="model config.json for a DeepSpeed checkpoint (default: "
                                          "<model>/config.json or <model>/../config.json)")
    p.add_argument("--tag", help="DeepSpeed checkpoint tag (default: the one named in <model>/latest)")
    p.add_argument("--shards", help="the split to evaluate: directory, manifest.json or brace pattern "
                                    "(default: the embedded demo's synthetic test split)")
    p.add_argument("--tokenizer", help=".model (SentencePiece) or vocab .txt (default: <model>/tokenizer.*, "
                                       "else the demo's tokenizer)")
    p.add_argument("--quadruples", help="JSON list of {image0, caption0, image1, caption1} (image keys and "
                                        "caption strings) for Winoground scores (default: the split's "
                                        "quadruples.json)")
    p.add_argument("--relations", help="a split of relation-swap quadruples (images + quadruples.json) whose "
                                       "Winoground scores replace the evaluated split's (default: the embedded "
                                       "demo's relations split when --shards is not given)")
    p.add_argument("--out", default="runs/evaluate", help="output directory (default: %(default)s)")
    p.add_argument("--k", type=int, default=16,
                   help="two-stage: images shortlisted per text query by ITC "
                        "(16 demo, 128 as ALBEF on Flickr30k; default %(default)s)")
    p.add_argument("--k-texts", type=int, help="two-stage: texts shortlisted per image query (default: --k)")
    p.add_argument("--score-batch", type=int, default=256,
                   help="pairs per cross-encoder forward (default %(default)s)")
    p.add_argument("--encode-batch", type=int, default=64,
                   help="images/texts per encoder call (default %(default)s)")
    p.add_argument("--image-block", type=int, default=1024,
                   help="full retrieval: images whose backbone tokens are held at once per rank, bounding "
                        "memory (default %(default)s)")
    p.add_argument("--no-full", action="store_true",
                   help="skip full N x M retrieval (recalls from two-stage)")
    p.add_argument("--no-two-stage", action="store_true", help="skip two-stage retrieval")
    p.add_argument("--no-isd", action="store_true", help="skip ISD / ISDa")
    p.add_argument("--no-winoground", action="store_true", help="skip Winoground scores")
    p.add_argument("--isd-alignments", default="singular,distributed,congruence",
                   help="comma list of ISD alignments (default %(default)s)")
    p.add_argument("--isd-sides", default="L,V", help="comma list of ISD sides L,V (default %(default)s)")
    p.add_argument("--isd-layer", type=int, default=-1, help="layer whose attention ISD uses (default: last)")
    p.add_argument("--isd-max-pairs", type=int, default=256,
                   help="matched pairs used for ISD, 0 = all (default %(default)s)")
    p.add_argument("--pictures", type=int, default=4,
                   help="pairs/queries drawn as PNG, 0 = none (default %(default)s)")
    p.add_argument("--max-regions", type=int, default=36, help="regions per image in roi/features mode")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--mlflow", action="store_true", help="log metrics and pictures to a new MLflow run")
    p.add_argument("--mlflow-run-id", default=os.environ.get("MLFLOW_RUN_ID"),
                   help="continue this MLflow run (default: $MLFLOW_RUN_ID)")
    p.add_argument("--experiment", default="relalign-eval", help="MLflow experiment for --mlflow")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # deepspeed launcher
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def eval_config(args: argparse.Namespace):
    from pipeline.evaluation import EvalConfig
    split = [x.strip() for x in args.isd_alignments.split(",") if x.strip()]
    sides = [x.strip() for x in args.isd_sides.split(",") if x.strip()]
    return EvalConfig(full=not args.no_full, two_stage=not args.no_two_stage, score_batch=args.score_batch,
                      encode_batch=args.encode_batch, image_block=args.image_block, two_stage_k=args.k, two_stage_k_texts=args.k_texts,
                      isd_alignments=tuple(split) if not args.no_isd else (), isd_sides=tuple(sides),
                      isd_layer=args.isd_layer, isd_max_pairs=args.isd_max_pairs or None,
                      winoground=not args.no_winoground, pictures=args.pictures, progress=not args.quiet)


# ----------------------------------------------------------------------------- model

def _model_config_file(model_dir: Path, given: str | None) -> Path:
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"--model-config {given}: no such file")
        return path
    candidates = (model_dir / "config.json", model_dir.parent / "config.json",
                  model_dir.parent / "model" / "config.json")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"--model {model_dir} is a DeepSpeed checkpoint without a model config.json next to it: "
                    "pass --model-config (the config.json of a save_pretrained directory of the same model)")


def load_model(path: str, model_config: str | None = None, tag: str | None = None):
    """RetrievalModel from a save_pretrained directory or a DeepSpeed checkpoint directory (fp32)."""
    from models import ModelConfig, RetrievalModel
    from pipeline.train.checkpoint import checkpoint_state_dict
    model_dir = Path(path)
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        return RetrievalModel.from_pretrained(model_dir)
    if not (model_dir / "latest").is_file() and tag is None:
        raise UserError(f"--model {path}: neither a save_pretrained directory (config.json + "
                        "model.safetensors) nor a DeepSpeed checkpoint directory (with a 'latest' file)")
    config = ModelConfig.from_dict(json.loads(_model_config_file(model_dir, model_config).read_text()))
    state = checkpoint_state_dict(model_dir, tag)
    model = RetrievalModel(config, load_backbone_weights=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"mlm_head.decoder.weight"}:
        raise UserError(f"--model {path}: checkpoint does not match the model config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); pass the right --model-config")
    return model


def load_tokenizer_for(args: argparse.Namespace, demo_cfg):
    from pipeline.data.tokenizer import load_tokenizer
    if args.tokenizer:
        if not Path(args.tokenizer).is_file():
            raise UserError(f"--tokenizer {args.tokenizer}: no such file")
        return load_tokenizer(args.tokenizer)
    for base in (Path(args.model), Path(args.model).parent / "model"):
        for name in ("tokenizer.model", "tokenizer.txt"):
            if (base / name).is_file():
                return load_tokenizer(base / name)
    if demo_cfg is not None:
        from pipeline.config import split_path
        from pipeline.train.build import tokenizer_path
        path = tokenizer_path(demo_cfg, [split_path(demo_cfg, "train")])
        if path.is_file():
            return load_tokenizer(path)
    raise UserError(f"no tokenizer: --model {args.model} holds no tokenizer.model/tokenizer.txt; "
                    "pass --tokenizer")


# ----------------------------------------------------------------------------- data

def resolve_split(args: argparse.Namespace):
    """(shards spec, demo experiment config or None)."""
    from pipeline.config import check_shards_exist
    if args.relations:
        check_shards_exist(args.relations, "--relations")
    if args.shards:
        check_shards_exist(args.shards, "--shards")
        return args.shards, None
    from pipeline.config import load_config, split_path
    from pipeline.train.build import ensure_data
    cfg = load_config(DEMO_CONFIG)
    ensure_data(cfg, progress=not args.quiet)
    return split_path(cfg, "test"), cfg


def load_data(args: argparse.Namespace, shards: str, model, tokenizer):
    from pipeline.data.eval_split import load_eval_split
    from pipeline.data.loader import LoaderConfig
    mc = model.config
    kw = dict(shards=shards, image_size=mc.image.image_size, max_text_len=mc.max_text_len, num_workers=0,
              image_mode=mc.image.mode, max_regions=args.max_regions, feat_dim=mc.image.feat_dim)
    loader_cfg = LoaderConfig.for_model(mc.image.backbone, **kw) if mc.image.mode != "features" \
        else LoaderConfig(**kw)
    return load_eval_split(shards, tokenizer, loader_cfg)


def user_quadruples(args: argparse.Namespace, data, tokenizer, max_len: int):
    from pipeline.evaluation import resolve_quadruples
    try:
        entries = json.loads(Path(args.quadruples).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--quadruples {args.quadruples}: unreadable JSON ({exc})") from exc
    if not isinstance(entries, list):
        raise UserError(f"--quadruples {args.quadruples}: expected a JSON list of quadruple objects")
    return resolve_quadruples(data, entries, tokenizer, max_len)


# ----------------------------------------------------------------------------- output

def results_table(metrics: dict[str, float]) -> str:
    rows = ["| retrieval | txt_r1 | txt_r5 | txt_r10 | img_r1 | img_r5 | img_r10 | rsum | seconds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    kinds = (("full", "", "full_seconds"), ("two-stage", "two_stage_", "two_stage_seconds"))
    for name, prefix, seconds in kinds:
        keys = [f"{prefix}{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)] + [f"{prefix}rsum"]
        if all(k in metrics for k in keys) and seconds in metrics:
            rows.append(f"| {name} | " + " | ".join(f"{metrics[k]:.1f}" for k in keys)
                        + f" | {metrics[seconds]:.1f} |")
    lines = ["\n".join(rows)]
    if "full_pairs_per_s" in metrics:
        lines.append(f"full scoring: {metrics['full_pairs_per_s']:.0f} pairs/s")
    isd = [f"{k}={v:.4f}" for k, v in metrics.items()
           if k.startswith("isd_") and not k.endswith(("seconds", "pairs"))]
    if isd:
        lines.append("ISD (paper, what IAIS minimises): " + "  ".join(isd))
    if "isda" in metrics:
        lines.append(f"ISDa (relation consistency vs annotations, 0 = consistent): {metrics['isda']:.4f} over "
                     f"{int(metrics.get('isda_words', 0))} of {int(metrics.get('isda_words_annotated', 0))} "
                     f"annotated words matched to a region; grounding accuracy {metrics.get('grounding_acc', 0):.1f}%")
    wino = [f"{k}={metrics[k]:.1f}" for k in ("wino_text", "wino_image", "wino_group") if k in metrics]
    if wino:
        lines.append(f"Winoground ({int(metrics['wino_quadruples'])} quadruples): " + "  ".join(wino))
    return "\n".join(lines)


def log_to_mlflow(args: argparse.Namespace, metrics: dict[str, float], out: Path) -> None:
    from pipeline.tracking import Tracker, TrackingConfig
    cfg = TrackingConfig(experiment_name=args.experiment)
    tracker = Tracker.create(cfg, True, out, resume_run_id=args.mlflow_run_id)
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    tracker.log_artifact(out / "results.json")
    if (out / "pictures").is_dir():
        tracker.log_artifact(out / "pictures", "eval_pictures")
    tracker.close()


# ----------------------------------------------------------------------------- main

def init_distributed(device_arg: str):
    import torch
    import torch.distributed as dist
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device_arg}: use auto, cpu or cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device


def run(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from pipeline import distributed as ddp
    from pipeline.evaluation import evaluate
    from pipeline.evaluation.evaluate import relations_split, winoground_on_split
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = eval_config(args)
    device = init_distributed(args.device)
    shards, demo_cfg = resolve_split(args)
    model = load_model(args.model, args.model_config, args.tag).to(device)
    tokenizer = load_tokenizer_for(args, demo_cfg)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"tokenizer has vocab_size {tokenizer.vocab_size} but the model {args.model} has "
                        f"{model.config.vocab_size}: pass the tokenizer the model was trained with "
                        "(--tokenizer)")
    data = load_data(args, shards, model, tokenizer)
    quads = None
    if args.quadruples:
        data, quads = user_quadruples(args, data, tokenizer, model.config.max_text_len)
    out = Path(args.out)
    pictures = out / "pictures" if cfg.pictures else None
    result = evaluate(model, data, cfg, quadruples=quads, picture_dir=pictures)
    relations = args.relations or (relations_split(demo_cfg) if demo_cfg is not None else None)
    if relations and cfg.winoground:
        result.metrics.update(winoground_on_split(model, load_data(args, relations, model, tokenizer), cfg))
    if ddp.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"model": str(args.model), "shards": str(shards), "images": data.n_images,
                   "captions": data.n_texts, "skipped_samples": data.skipped, "world_size": ddp.world_size(),
                   "device": str(device), "metrics": result.metrics}
        (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        print(results_table(result.metrics), flush=True)
        if data.skipped:
            print(f"skipped unreadable samples of {shards}: {data.skipped}", flush=True)
        print(f"results: {out / 'results.json'}", flush=True)
        if args.mlflow or args.mlflow_run_id:
            log_to_mlflow(args, result.metrics, out)
    return result.metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code_of(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
