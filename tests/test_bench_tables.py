"""The arithmetic of bench/mining.py, bench/growth.py, bench/launched.py and bench/eval.py's extrapolation, and
bench/memory.py's run overrides, on inputs whose answers are known (their real runs are the benchmarks
themselves, not CI)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import growth  # noqa: E402
import launched  # noqa: E402
import memory  # noqa: E402
import mining  # noqa: E402


def test_the_logged_step_time_skips_the_first_window_and_reads_only_training_rows(tmp_path):
    rows = [{"step": 5, "samples_per_s": 1.0, "loss": 1}, {"step": 6, "val/rsum": 3.0},
            {"step": 10, "samples_per_s": 8.0}, {"step": 15, "samples_per_s": 4.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert launched.logged_step_seconds(path, batch=8) == pytest.approx((8 / 8 + 8 / 4) / 2)
    assert math.isnan(launched.logged_step_seconds(tmp_path / "absent.jsonl", batch=8))


def test_the_zero_configs_of_the_benchmarks_use_torch_adamw(tmp_path):
    for stage, name in (("0", "zero0"), ("3", "zero3"), ("3o", "zero3_offload")):
        path = launched.ds_config(stage, tmp_path)
        assert path == tmp_path / f"{name}.json"
        assert json.loads(path.read_text())["optimizer"]["params"]["torch_adam"] is True
    assert json.loads((tmp_path / "zero3_offload.json").read_text())["zero_optimization"]["offload_param"]


def test_mining_modes_cross_score_all_candidates_or_only_the_itc_shortlist(tmp_path):
    args = mining.parse_args(["--candidates", "399", "--hard", "31", "--shortlists", "47,95"])
    modes = mining.modes(args)
    assert [(m.name, m.negative_size, m.preselect) for m in modes] == [
        ("full", 399, 0), ("itc47", 47, 399), ("itc95", 95, 399)]
    assert [m.scored_per_anchor(31) for m in modes] == [399, 47, 95]
    kept_whole = mining.modes(mining.parse_args(["--hard", "31", "--shortlists", "31"]))[1]
    assert kept_whole.scored_per_anchor(31) == 0      # the shortlist is the kept set: nothing cross-scored
    sets = mining.run_sets(args, modes[1], 3, tmp_path / "run")
    assert {"finetune.negative_size=47", "finetune.itc_preselect=399", "finetune.hard_size=31", "seed=3",
            "tracking.enabled=false"} <= set(sets)


def test_the_mining_table_pairs_recall_by_seed_and_divides_the_step_times():
    args = mining.parse_args(["--shortlists", "47"])
    full, short = mining.modes(args)
    results = {("full", 0): {"step_s": 6.0, "r1": 40.0, "txt_r1": 38.0, "img_r1": 42.0, "rsum": 300.0},
               ("full", 1): {"step_s": 6.0, "r1": 30.0, "txt_r1": 30.0, "img_r1": 30.0, "rsum": 250.0},
               ("itc47", 0): {"step_s": 2.0, "r1": 39.0, "txt_r1": 38.0, "img_r1": 40.0, "rsum": 290.0},
               ("itc47", 1): {"step_s": 2.0, "r1": 29.0, "txt_r1": 29.0, "img_r1": 29.0, "rsum": 240.0}}
    text, values = mining.table(args, results)
    assert set(values) == {"full_step_s", "speedup_itc47", "r1_drop_itc47"}
    assert values["full_step_s"] == 6.0
    assert values["speedup_itc47"] == pytest.approx(3.0)
    assert values["r1_drop_itc47"] == pytest.approx(1.0)     # paired: 40-39 and 30-29
    assert "| itc47 | 47 |" in text and "3.00x" in text


def test_growth_changes_one_knob_at_a_time_and_lists_the_reference_once():
    rows = growth.rows(quick=False)
    assert len(rows) == len(set(rows))
    reference_like = [r for r in rows if r[1] == growth.REFERENCE[r[0]]]
    assert len(reference_like) == 1
    sets, ranks = growth.sets_for("image_size", 96, steps=12, batch=8)
    assert "data.image_size=96" in sets and "finetune.negative_size=31" in sets and ranks == 1
    assert growth.sets_for("ranks", 2, steps=12, batch=8)[1] == 2


def test_the_retrieval_extrapolation_recovers_the_cost_model_it_was_measured_with():
    import eval as bench_eval
    a, b, c = 2e-4, 3e-3, 1e-3
    points = [(n, 5 * n, a * n * 5 * n + b * n, c * 6 * n) for n in (50, 100, 200)]
    fit = bench_eval.extrapolate(points)
    assert fit["coco5k_full_s"] == pytest.approx(a * 5000 * 25000 + b * 5000)
    assert fit["coco5k_two_stage_s"] == pytest.approx(c * 30000)


def test_the_memory_runs_take_the_data_worker_count_asked_for_and_the_config_default_otherwise():
    from pipeline.config import load_config
    default = load_config(launched.DEMO_CONFIG).data.num_workers
    unasked = load_config(launched.DEMO_CONFIG, memory.cell_sets("base", memory.parse_args([])))
    assert unasked.data.num_workers == default
    asked = load_config(launched.DEMO_CONFIG, memory.cell_sets("base", memory.parse_args(["--workers", "0"])))
    assert (asked.data.num_workers, asked.model.preset, asked.train.steps) == (0, "base", 3)
