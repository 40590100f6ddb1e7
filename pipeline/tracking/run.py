"""The MLflow side: one run, created or resumed (``RunSpec``, ``open_run``), and the ``RunWriter`` that sends
log operations into it; ``DatasetRef`` is a dataset input of a run."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

from pipeline.tracking.common import (MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VALUE,
                                      _chunks, _local_artifact_location, log)


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """A shard set logged as an MLflow dataset input: ``name`` (the split), where it is, a short digest of its
    manifest (or of the spec) and the role it plays in the run ("train", "val", "test")."""
    name: str
    source: str
    digest: str
    context: str

    @property
    def source_type(self) -> str:
        return "http" if self.source.startswith(("http://", "https://")) else "local"


def _dataset_input(ref: DatasetRef):
    from mlflow.entities import Dataset, DatasetInput, InputTag
    dataset = Dataset(name=ref.name, digest=ref.digest, source_type=ref.source_type,
                      source=json.dumps({"uri": ref.source}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", ref.context)])


class RunWriter:
    """Sends log operations (the queue's tuples) into one existing MLflow run."""

    def __init__(self, client, run_id: str, logged_params: Mapping[str, str] | None = None):
        self.client = client
        self.run_id = run_id
        self.logged_params: dict[str, str] = dict(logged_params or {})

    def apply(self, op: tuple, skip_logged_metrics: bool = False) -> None:
        """``skip_logged_metrics``: first leave out the values the run already holds (same key, step and
        timestamp), for a request that may have reached the server before (MLflow would store them twice)."""
        from mlflow.entities import Metric, Param, RunTag

        kind, client, run_id = op[0], self.client, self.run_id
        if kind == "metrics":
            items = self._not_yet_logged(op[1]) if skip_logged_metrics else op[1]
            for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in chunk])
        elif kind == "params":
            for chunk in _chunks(self._new_params(op[1]), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
                self.logged_params.update(chunk)
        elif kind == "tags":
            for chunk in _chunks(op[1], MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk])
        elif kind in ("artifact", "model") and not Path(op[1]).exists():
            log.warning("MLflow: %s no longer exists; not logged", op[1])
        elif kind == "artifact":
            path, artifact_path = op[1], op[2]
            if Path(path).is_dir():
                client.log_artifacts(run_id, path, artifact_path)
            else:
                client.log_artifact(run_id, path, artifact_path)
        elif kind == "inputs":
            client.log_inputs(run_id, datasets=[_dataset_input(d) for d in op[1]])
        elif kind == "model":
            self._log_model(op[1], op[2])
        elif kind == "end":
            client.set_terminated(run_id, status=op[1])

    def _not_yet_logged(self, items: list) -> list:
        keys = {item[0] for item in items}
        logged = {(key, m.step, m.timestamp) for key in keys for m in self.client.get_metric_history(self.run_id, key)}
        return [item for item in items if (item[0], item[3], item[2]) not in logged]

    def _log_model(self, path: str, name: str) -> None:
        client, run = self.client, self.client.get_run(self.run_id)
        model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=self.run_id)
        try:
            client.log_model_artifacts(model.model_id, path)
        except Exception:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise
        client.finalize_logged_model(model.model_id, "READY")

    def _new_params(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """MLflow params are immutable: skip ones already logged; name changed ones (resume) in a tag."""
        new, changed = {}, []
        for key, value in items:
            old = self.logged_params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                changed.append(key)
        if changed:
            log.info("MLflow: params already logged with other values, kept as they were: %s", changed)
            self.client.set_tag(self.run_id, "relalign.params_changed", ",".join(changed)[:MAX_TAG_VALUE])
        return list(new.items())


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What a new run is created from (also written at the head of a spool, for a replay that must create it)."""
    tracking_uri: str
    experiment_name: str
    run_name: str | None = None
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    resume_run_id: str | None = None


def open_run(client, spec: RunSpec) -> RunWriter:
    """The run ``spec.resume_run_id`` (set RUNNING again) when it exists, else a new run of ``spec``."""
    tags = dict(spec.tags)
    if spec.resume_run_id:
        run = _find_run(client, spec)
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            log.info("MLflow: resumed run %s", run.info.run_id)
            return RunWriter(client, run.info.run_id, run.data.params)
        tags["relalign.resumed_from_run_id"] = spec.resume_run_id
    run = client.create_run(_experiment_id(client, spec), run_name=spec.run_name, tags=tags)
    log.info("MLflow: started run %s", run.info.run_id)
    return RunWriter(client, run.info.run_id)


def _find_run(client, spec: RunSpec):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(spec.resume_run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    log.warning("MLflow: run %s (to continue) does not exist at %s; starting a new run",
                spec.resume_run_id, spec.tracking_uri)
    return None


def _experiment_id(client, spec: RunSpec) -> str:
    from mlflow.exceptions import MlflowException

    name = spec.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_local_artifact_location(spec.tracking_uri))
        except MlflowException as exc:  # another job created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id
