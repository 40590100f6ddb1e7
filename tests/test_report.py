"""The one printed results table (training's validation/test tables and launch/evaluate.py's output)."""
from __future__ import annotations

from pipeline.evaluation.report import results_table

RECALLS = {"txt_r1": 10.0, "txt_r5": 20.0, "txt_r10": 30.0, "img_r1": 11.0, "img_r5": 21.0, "img_r10": 31.0,
           "rsum": 123.0}


def test_full_and_two_stage_rows_isd_per_alignment_and_side_isda_and_winoground():
    metrics = {**RECALLS, **{f"two_stage_{k}": v + 1 for k, v in RECALLS.items()},
               "full_seconds": 12.5, "two_stage_seconds": 1.5, "full_pairs_per_s": 2000.0,
               "isd_singular_L": 0.25, "isd_singular_V": 0.5, "isd_distributed_L": 0.125, "isd_seconds": 3.0,
               "isda": 0.0625, "isda_words": 7.0, "isda_words_annotated": 9.0, "isda_pairs": 4.0,
               "grounding_acc": 42.0, "wino_text": 50.0, "wino_image": 25.0, "wino_group": 12.5,
               "wino_quadruples": 4.0, "winoground_seconds": 0.5}
    table = results_table(metrics, "test")
    assert table.splitlines()[0] == "test:"
    assert "| full | 10.0 | 20.0 | 30.0 | 11.0 | 21.0 | 31.0 | 123.0 | 12.5 |" in table
    assert "| two-stage | 11.0 | 21.0 | 31.0 | 12.0 | 22.0 | 32.0 | 124.0 | 1.5 |" in table
    assert "| singular | 0.2500 | 0.5000 |" in table and "| distributed | 0.1250 | - |" in table
    assert "isd_seconds" not in table and "3.0000" not in table
    assert "0.0625 over 7 of 9 annotated words" in table and "grounding accuracy 42.0%" in table
    assert "Winoground (4 quadruples, percent): text 50.0  image 25.0  group 12.5" in table
    assert "winoground_seconds" not in table and "0.5" not in table.split("Winoground")[1]


def test_without_full_retrieval_the_copied_recalls_are_not_shown_as_full():
    metrics = {**RECALLS, **{f"two_stage_{k}": v for k, v in RECALLS.items()}, "two_stage_seconds": 2.0}
    table = results_table(metrics)
    assert "| two-stage |" in table and "| full |" not in table


def test_training_metrics_without_timings_still_print_and_training_keeps_its_name():
    table = results_table({**RECALLS, "isda": float("nan"), "isda_words": 0.0}, "validation @ step 5")
    assert "| full | 10.0 |" in table and table.endswith("grounding accuracy -%")
    assert "ISDa (relation consistency vs annotations, 0 = consistent): - over 0 of 0" in table
