"""The one printed table of evaluation results, for the training stages and launch/evaluate.py alike."""
from __future__ import annotations

import math
import re
from typing import Optional

_RECALLS = tuple(f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)) + ("rsum",)
_ISD_KEY = re.compile(r"isd_(?P<alignment>[a-z]+)_(?P<side>[LV])")


def results_table(metrics: dict[str, float], title: Optional[str] = None) -> str:
    """Markdown-ish report: recalls (full and two-stage), ISD per alignment and side, ISDa with the words
    it matched and grounding accuracy, Winoground scores. Sections without metrics are left out."""
    sections = [recall_rows(metrics), isd_rows(metrics), isda_line(metrics), winoground_line(metrics)]
    lines = [f"{title}:"] if title else []
    return "\n".join(lines + [s for s in sections if s])


def recall_rows(metrics: dict[str, float]) -> str:
    rows = []
    # without full retrieval the un-prefixed recalls are a copy of the two-stage ones
    if "full_seconds" in metrics or "two_stage_txt_r1" not in metrics:
        rows.append(_recall_row("full", "", metrics.get("full_seconds"), metrics))
    rows.append(_recall_row("two-stage", "two_stage_", metrics.get("two_stage_seconds"), metrics))
    rows = [r for r in rows if r]
    if not rows:
        return ""
    head = ["| retrieval | txt_r1 | txt_r5 | txt_r10 | img_r1 | img_r5 | img_r10 | rsum | seconds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    note = ["(txt_r: image -> text, img_r: text -> image, percent)"]
    if "full_pairs_per_s" in metrics:
        note.append(f"full scoring: {metrics['full_pairs_per_s']:.0f} pairs/s")
    return "\n".join(head + rows + note)


def _recall_row(name: str, prefix: str, seconds: Optional[float], metrics: dict[str, float]) -> str:
    keys = [prefix + k for k in _RECALLS]
    if not all(k in metrics for k in keys):
        return ""
    cells = [_num(metrics[k], 1) for k in keys] + [_num(seconds, 1)]
    return f"| {name} | " + " | ".join(cells) + " |"


def isd_rows(metrics: dict[str, float]) -> str:
    found: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        match = _ISD_KEY.fullmatch(key)
        if match:
            found.setdefault(match["alignment"], {})[match["side"]] = value
    if not found:
        return ""
    rows = ["| ISD (paper, what IAIS minimises) | L | V |", "| --- | --- | --- |"]
    for alignment, sides in found.items():
        rows.append(f"| {alignment} | " + " | ".join(_num(sides.get(s), 4) for s in ("L", "V")) + " |")
    return "\n".join(rows)


def isda_line(metrics: dict[str, float]) -> str:
    if "isda" not in metrics:
        return ""
    words, annotated = int(metrics.get("isda_words", 0)), int(metrics.get("isda_words_annotated", 0))
    return (f"ISDa (relation consistency vs annotations, 0 = consistent): {_num(metrics['isda'], 4)} over "
            f"{words} of {annotated} annotated words matched to a region; "
            f"grounding accuracy {_num(metrics.get('grounding_acc'), 1)}%")


def winoground_line(metrics: dict[str, float]) -> str:
    scores = [f"{k} {_num(metrics[f'wino_{k}'], 1)}" for k in ("text", "image", "group")
              if f"wino_{k}" in metrics]
    if not scores:
        return ""
    return f"Winoground ({int(metrics.get('wino_quadruples', 0))} quadruples, percent): " + "  ".join(scores)


def _num(value: Optional[float], digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# training's name for the same printer; pipeline/train/finetune.py still imports it
