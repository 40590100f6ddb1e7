"""The MLflow run of a training job: one run per job whatever its nodes, ranks and restarts.

Rank 0 logs (``pipeline.tracking``); a resumed job continues the run whose id its checkpoint holds. The run is
named after the experiment and stage, tagged with what a user filters by (stage, preset, IAIS alignment,
ZeRO stage) and, per attempt, with the restart count, the node list and the checkpoint it resumed from. Its
shard sets are MLflow dataset inputs; each node's first rank logs that node's system metrics into it. A
fine-tune whose init is an exported pretraining run is that run's child (pretrain -> fine-tune chains)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

from pipeline import distributed as dist_utils
from pipeline.config import flatten, split_path, to_dict
from pipeline.train.runtime import Run, zero_stage
from pipeline.tracking import (DatasetRef, Tracker, package_versions, resolve_tracking_uri, set_http_env,
                               start_node_metrics)


def open_tracker(run: Run, client: Optional[dict]) -> Tracker:
    """Collective. The run's tracker; a resumed run (``client``: its checkpoint's client state) continues its
    MLflow run, a new one logs params, configs and dataset inputs first."""
    cfg = run.cfg
    tracker = Tracker.create(cfg.tracking, run.is_main, run.run_dir,
                             resume_run_id=client.get("mlflow_run_id") if client else None,
                             run_name=f"{cfg.name}-{run.stage}", tags=run_tags(run))
    info = run_info(run)
    if client is None:
        tracker.log_params({**tracker_params(run), **info})
        tracker.log_artifact(run.run_dir / "experiment.yaml", "configs")
        tracker.log_artifact(run.run_dir / "ds_config.json", "configs")
        tracker.log_inputs(dataset_refs(run))
    tracker.set_tags(attempt_tags(client, info["hostnames"]))
    _start_node_metrics(run, tracker)
    return tracker


def run_tags(run: Run) -> dict[str, str]:
    cfg = run.cfg
    iais = cfg.finetune.iais
    alignment = iais.alignment if run.stage == "finetune" and iais.weight > 0 else "none"
    tags = {"relalign.stage": run.stage, "relalign.preset": cfg.model.preset, "relalign.iais_alignment": alignment,
            "relalign.zero_stage": str(zero_stage(run))}
    parent = _pretraining_run_id(cfg.model.init) if run.stage == "finetune" else None
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def _pretraining_run_id(init: Optional[str]) -> Optional[str]:
    from pipeline.train.stages import stamp_run_id
    return stamp_run_id(Path(init)) if init else None


def attempt_tags(client: Optional[dict], hostnames: str, env=os.environ) -> dict[str, str]:
    """What changes with each start of the job (tags, since MLflow params are immutable)."""
    tags = {"relalign.restart_count": env.get("SLURM_RESTART_COUNT", "0"),
            "relalign.nodes": env.get("SLURM_JOB_NODELIST") or hostnames}
    if env.get("SLURM_JOB_ID"):
        tags["relalign.slurm_job_id"] = env["SLURM_JOB_ID"]
    if client is not None:
        tags["relalign.resumed_from"] = f"step{client['step']:07d}"
    return tags


def tracker_params(run: Run) -> dict[str, Any]:
    params = {f"config.{k}": v for k, v in flatten(to_dict(run.cfg)).items()}
    params.update({f"ds.{k}": v for k, v in flatten(run.ds_config).items()})
    params.update({f"version.{k}": v for k, v in package_versions().items()})
    return params


def run_info(run: Run) -> dict[str, Any]:
    """Collective: world size, node count, host names."""
    hosts = dist_utils.hostnames()
    return {"world_size": run.world_size, "node_count": dist_utils.node_count(),
            "hostnames": ",".join(sorted(set(hosts)))}


def dataset_refs(run: Run) -> list[DatasetRef]:
    """The shard sets the run trains and evaluates on."""
    cfg = run.cfg
    if run.stage == "pretrain" and cfg.pretrain.sources:
        specs = [(f"source{i}", s.shards, "train") for i, s in enumerate(cfg.pretrain.sources)]
    else:
        splits = ["train"] if run.stage == "pretrain" else ["train", "val", "test"]
        specs = [(split, split_path(cfg, split), split) for split in splits]
    return [DatasetRef(name=name, source=str(spec), digest=_digest(str(spec)), context=context)
            for name, spec, context in specs if spec]


def _digest(spec: str) -> str:
    """Hash of the split's manifest when it is a local directory (its content), else of the spec itself."""
    manifest = Path(spec) / "manifest.json"
    data = manifest.read_bytes() if "://" not in spec and manifest.is_file() else spec.encode("utf-8")
    return hashlib.sha1(data).hexdigest()[:12]


def _start_node_metrics(run: Run, tracker: Tracker) -> None:
    """Collective: each node's first rank monitors its node into rank 0's run."""
    tracking = run.cfg.tracking
    run_id = dist_utils.all_gather_object(tracker.run_id if run.is_main else None)[0]
    if not (tracking.enabled and tracking.system_metrics_interval_s and run_id and dist_utils.local_rank() == 0):
        return
    set_http_env(tracking)
    node = dist_utils.discover(os.environ).node_rank
    monitor = start_node_metrics(run_id, node, resolve_tracking_uri(tracking, run.run_dir),
                                 tracking.system_metrics_interval_s)
    if monitor is not None:
        tracker.attach_node_metrics(monitor)
