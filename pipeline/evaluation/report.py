"""The printed tables of evaluation results (training stages and launch/evaluate.py)."""
from __future__ import annotations


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
