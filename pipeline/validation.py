"""Validation / test during training: ``pipeline.evaluation.evaluate`` on an in-memory split, and the
recall table printed by the training stages."""
from __future__ import annotations


def evaluate_split(module, data, cfg, picture_dir=None) -> dict[str, float]:
    """Collective. ``data``: an EvalData; ``cfg``: pipeline.evaluation.EvalConfig (the ``eval`` section).
    Samples of the split that could not be read are reported as ``skipped_<reason>`` counts."""
    from pipeline.evaluation import evaluate
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
    from pipeline.evaluation import winoground_metrics
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


def recall_table(metrics: dict[str, float], title: str) -> str:
    head = f"{title}: " + "  ".join(f"{k}={metrics[k]:.1f}" for k in
                                    ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "rsum")
                                    if k in metrics)
    rows = ["| direction | R@1 | R@5 | R@10 |", "| --- | --- | --- | --- |"]
    for name, prefix in (("image -> text (txt_r)", "txt_r"), ("text -> image (img_r)", "img_r")):
        if f"{prefix}1" in metrics:
            rows.append(f"| {name} | " + " | ".join(f"{metrics[f'{prefix}{k}']:.1f}" for k in (1, 5, 10)) + " |")
    extra = [f"rsum {metrics['rsum']:.1f}"] if "rsum" in metrics else []
    extra += [f"{k} {v:.3f}" for k, v in sorted(metrics.items()) if k.startswith("isd_")]
    extra += [f"{k} {metrics[k]:.3f}" for k in ("isda", "grounding_acc") if k in metrics]
    extra += [f"{k} {v:.1f}" for k, v in sorted(metrics.items()) if k.startswith("wino")]
    return "\n".join([head, *rows, ", ".join(extra)])
