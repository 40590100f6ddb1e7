#!/usr/bin/env python
"""relalign evaluation: full and two-stage retrieval recall, ISD/ISDa, Winoground scores, pictures.

    python launch/evaluate.py --model runs/demo_tiny/model [--shards DIR] [--out DIR] [...]
    deepspeed --num_gpus 2 launch/evaluate.py --model DIR ...     (work split across the ranks)
    srun --ntasks 4 python launch/evaluate.py --model DIR ...     (or torchrun; ranks from the launcher's env)

--model is a save_pretrained directory (config.json + model.safetensors, usually with tokenizer.model)
or a DeepSpeed checkpoint directory (holding `latest`; give --model-config unless a config.json sits
in it or its parent). Without --shards the embedded demo's synthetic test split is used (built on
first use). Results: <out>/results.json, a printed table, PNG pictures in <out>/pictures, and MLflow
metrics when a run is active (--mlflow-run-id or $MLFLOW_RUN_ID continues a run, --mlflow starts one).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # runnable from a plain checkout too

from pipeline.errors import exit_code_of  # noqa: E402


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
    p.add_argument("--timeout-s", type=float, default=None,
                   help="collective timeout in seconds (default: $DEEPSPEED_TIMEOUT minutes, else 10 minutes)")
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
                      encode_batch=args.encode_batch, image_block=args.image_block, two_stage_k=args.k,
                      two_stage_k_texts=args.k_texts,
                      isd_alignments=tuple(split) if not args.no_isd else (), isd_sides=tuple(sides),
                      isd_layer=args.isd_layer, isd_max_pairs=args.isd_max_pairs or None,
                      winoground=not args.no_winoground, pictures=args.pictures, progress=not args.quiet)


def eval_job(args: argparse.Namespace):
    from pipeline.evaluation.run import EvalJob
    return EvalJob(model=args.model, out=args.out, model_config=args.model_config, tag=args.tag,
                   shards=args.shards, tokenizer=args.tokenizer, quadruples=args.quadruples,
                   relations=args.relations, max_regions=args.max_regions, device=args.device,
                   threads=args.threads, timeout_s=args.timeout_s,
                   mlflow=args.mlflow, mlflow_run_id=args.mlflow_run_id, experiment=args.experiment)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work():
        from pipeline.evaluation.run import run
        run(eval_job(args), eval_config(args))

    return exit_code_of(work)


if __name__ == "__main__":
    from pipeline.shutdown import skip_final_collection
    skip_final_collection()
    sys.exit(main())
