"""The ablation's MLflow parent run and its children, through pipeline.tracking (the one module that talks to
MLflow): bounded HTTP timeouts, and a dead server never stops the ablation.

Every fine-tune logs to the parent's store (its ``tracking.tracking_uri`` is pinned to it: left alone, each
run would open a sqlite store in its own run directory) and is tagged ``mlflow.parentRunId`` (nested under
the parent in the MLflow UI), ``ablation_variant`` and ``ablation_seed``, at creation through ``tracking.tags``."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pipeline.ablation.plan import Plan, RunSpec, quoted
from pipeline.config import ExperimentConfig, TrackingConfig
from pipeline.tracking import Tracker, resolve_tracking_uri

PARENT_FILE = "parent_run.json"
PARENT_TAG = "relalign.ablation"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class ParentRun:
    """The open parent run of one ablation (``open_parent`` makes it)."""

    def __init__(self, cfg: TrackingConfig, out: Path, tracker: Tracker, user_tags: Mapping[str, str]):
        self.cfg, self.out, self.tracker, self.user_tags = cfg, out, tracker, dict(user_tags)
        self.uri = resolve_tracking_uri(cfg, out)
        self.run_id = tracker.run_id
        self._save()

    def _save(self) -> None:
        state = {"run_id": self.run_id, "tracking_uri": self.uri, "experiment_name": self.cfg.experiment_name}
        (self.out / PARENT_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")

    def child_tags(self, spec: RunSpec) -> dict[str, str]:
        """The config's own tags (a tracking.tags override replaces them, so it repeats them) and the ablation's."""
        tags = {**self.user_tags, PARENT_TAG: "child", "ablation_variant": spec.variant,
                "ablation_seed": str(spec.seed)}
        return {**tags, "mlflow.parentRunId": self.run_id} if self.run_id else tags

    def child_sets(self, spec: RunSpec) -> list[str]:
        """--set for a child: the parent's store, a run name, and the tags."""
        return [f"tracking.tracking_uri={quoted(self.uri)}",
                f"tracking.run_name={quoted(f'{spec.variant}-seed{spec.seed}')}", tags_set(self.child_tags(spec))]

    def log_results(self, metrics: Mapping[str, float], artifacts: Sequence[Path]) -> None:
        self.tracker.log_metrics(metrics, step=0)
        for path in artifacts:
            self.tracker.log_artifact(path)

    def close(self, status: str) -> None:
        """End the parent run (FINISHED, FAILED or KILLED), flushing what is queued (bounded)."""
        self.tracker.close(status)


def tags_set(tags: Mapping[str, str]) -> str:
    """``tracking.tags={...}`` as a JSON object (a YAML flow mapping whose keys may hold dots)."""
    return "tracking.tags=" + json.dumps({str(k): str(v) for k, v in tags.items()})


def open_parent(cfg: ExperimentConfig, plan: Plan, params: Mapping[str, Any]) -> Optional[ParentRun]:
    """The parent run ``ablation-<config name>``: the one of <out>/parent_run.json when it is in the same store,
    else a new one. None when tracking is disabled."""
    if not cfg.tracking.enabled:
        return None
    plan.out.mkdir(parents=True, exist_ok=True)
    tcfg = dataclasses.replace(cfg.tracking, run_name=f"ablation-{cfg.name}",
                               tags={**cfg.tracking.tags, PARENT_TAG: "parent"})
    state = _read_json(plan.out / PARENT_FILE)
    same_store = (state.get("tracking_uri") == resolve_tracking_uri(tcfg, plan.out)
                  and state.get("experiment_name") == tcfg.experiment_name)
    tracker = Tracker.create(tcfg, True, plan.out, resume_run_id=state.get("run_id") if same_store else None)
    tracker.log_params(params)
    parent = ParentRun(tcfg, plan.out, tracker, cfg.tracking.tags)
    if parent.run_id is None:
        print(f"[ablation] MLflow at {parent.uri} is unavailable: the runs are not grouped under a parent run",
              file=sys.stderr, flush=True)
    else:
        print(f"[ablation] MLflow parent run {parent.run_id} at {parent.uri}", flush=True)
    return parent
