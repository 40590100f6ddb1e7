"""Retrieval evaluation on a split held in memory: full and two-stage cross-encoder retrieval
(``retrieval``), ISD / ISDa / grounding accuracy (``isd``), Winoground scores (``winoground``), all of them
together (``evaluate``), pictures and printed tables.

Work is split across the ranks of an initialised process group (any subset of it: every rank must call the
same functions in the same order). Every rank runs the SAME number of model calls in every stage because
under ZeRO-3 each forward gathers parameters collectively; the last rank's short slice is padded with dummy
work whose results are dropped. Pass the bare ``nn.Module`` (``engine.module`` for a DeepSpeed engine).
"""
from pipeline.config import EvalConfig
from pipeline.evaluation.evaluate import EvalResult, evaluate, evaluate_split
from pipeline.evaluation.isd import isd_metrics, region_targets
from pipeline.evaluation.retrieval import (encode_images, full_retrieval, itc_similarity, score_pairs, sharded_map,
                                           two_stage_recalls, two_stage_retrieval)
from pipeline.evaluation.winoground import resolve_quadruples, winoground_metrics

__all__ = ["EvalConfig", "EvalResult", "evaluate", "evaluate_split", "isd_metrics", "region_targets",
           "encode_images", "full_retrieval", "itc_similarity", "score_pairs", "sharded_map", "two_stage_recalls",
           "two_stage_retrieval", "resolve_quadruples", "winoground_metrics"]
