"""Every enabled evaluation on a split in memory (``evaluate``), and the training stages' use of it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.config import EvalConfig
from pipeline.evaluation.isd import isd_metrics
from pipeline.evaluation.retrieval import full_retrieval, sync_time, two_stage_recalls, two_stage_retrieval
from pipeline.evaluation.winoground import winoground_metrics
from pipeline.data.eval_split import EvalData
from pipeline.evaluation.metrics import retrieval_recalls


@dataclass
class EvalResult:
    """metrics: flat dict of floats (recalls, ISD, Winoground, pairs/s); timings: seconds per stage;
    scores: the full (or two-stage text->image) score matrix when computed (rank 0 and others alike)."""

    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    two_stage_scores: tuple[torch.Tensor, torch.Tensor] | None = None


# ----------------------------------------------------------------------------- all together

def evaluate(model, data: EvalData, cfg: EvalConfig | None = None,
             quadruples: list[tuple[int, int, int, int]] | None = None, picture_dir=None) -> EvalResult:
    """Every enabled evaluation on ``data``; collective: all ranks call it, all get the same metrics.

    ``data``: a split in memory (``pipeline.data.loader.load_eval_split``).

    Recall keys (txt_rK, img_rK, rsum, r_mean) come from full retrieval, or from two-stage when
    full is off; two-stage values are also reported as ``two_stage_<key>``. ``quadruples`` defaults
    to ``data.quadruples``. PNG pictures go to ``picture_dir`` (rank 0 writes) when given; give it
    on every rank (the pictures' attention forward is collective too).
    """
    cfg = cfg or EvalConfig()
    was_training = model.training
    model.eval()
    result = EvalResult()
    try:
        with torch.no_grad():
            _evaluate_into(result, model, data, cfg, quadruples, picture_dir)
    finally:
        model.train(was_training)
    return result


def _evaluate_into(result: EvalResult, model, data: EvalData, cfg: EvalConfig, quadruples,
                   picture_dir) -> None:
    m, timings = result.metrics, result.timings
    t0 = sync_time()
    if cfg.full:
        result.scores, stats = full_retrieval(model, data, cfg)
        m.update(retrieval_recalls(result.scores, data.text_to_image))
        timings.update(stats)
    if cfg.two_stage:
        t2i, i2t, stats = two_stage_retrieval(model, data, cfg)
        result.two_stage_scores = (t2i, i2t)
        recalls = two_stage_recalls(t2i, i2t, data.text_to_image)
        m.update({f"two_stage_{k}": v for k, v in recalls.items()})
        if not cfg.full:
            m.update(recalls)
        timings.update(stats)
    t1 = sync_time()
    m.update(isd_metrics(model, data, cfg))
    t2 = sync_time()
    timings["isd_seconds"] = t2 - t1
    if cfg.winoground:
        quads = data.quadruples if quadruples is None else quadruples
        m.update(winoground_metrics(model, data, quads, cfg))
    timings["winoground_seconds"] = sync_time() - t2
    if picture_dir is not None and cfg.pictures > 0:
        from pipeline.evaluation import pictures  # matplotlib only when pictures are wanted
        ranking = result.scores if result.scores is not None else (
            result.two_stage_scores[0] if result.two_stage_scores is not None else None)
        pictures.write_pictures(model, data, cfg, picture_dir, ranking)
    timings["total_seconds"] = sync_time() - t0
    m.update(timings)


# ----------------------------------------------------------------------------- the training stages

def evaluate_split(module, data, cfg, picture_dir=None) -> dict[str, float]:
    """Collective. ``data``: an EvalData; ``cfg``: pipeline.evaluation.EvalConfig (the ``eval`` section).
    Samples of the split that could not be read are reported as ``skipped_<reason>`` counts."""
    metrics = evaluate(module, data, cfg, picture_dir=picture_dir).metrics
    metrics.update({f"skipped_{reason}": float(n) for reason, n in sorted(data.skipped.items())})
    return metrics


def relations_split(cfg) -> str | None:
    """The relation-swap quadruple split of an experiment config: data.relations, else <root>/relations
    when it was built (the synthetic data) or exists."""
    from pipeline.config import resolve_path, split_path
    if cfg.data.relations:
        return cfg.data.relations
    path = split_path(cfg, "relations")
    return path if path is not None and resolve_path(path).is_dir() else None


def winoground_on_split(module, data, cfg) -> dict[str, float]:
    """Collective. Winoground text/image/group scores on a split of relation-swap quadruples (an EvalData
    whose quadruples.json was resolved): 4 pairs scored per quadruple, no retrieval over the split."""
    if not data.quadruples:
        return {}
    import torch
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return winoground_metrics(module, data, data.quadruples, cfg)
    finally:
        module.train(was_training)
