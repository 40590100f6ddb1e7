"""MLflow tracking that never stops or stalls training.

Only global rank 0 talks to MLflow: ``Tracker.create(cfg, is_main, output_dir)`` returns a real
``MlflowTracker`` there and a no-op ``Tracker`` everywhere else, so callers never branch on rank.
Every MLflow call (including the import of mlflow and the creation of the run) runs on one
background thread fed by a bounded queue: the training thread only appends to the queue. When the
queue is full the oldest metrics are dropped (and counted); when the server is unreachable the
thread warns once, drops what failed and pauses for ``retry_interval_s`` before trying again.

MLflow's own async logging (``synchronous=False``) is not used: its queue is unbounded, a failure
surfaces as an exception at flush time, and its atexit hook waits for the queue to drain, which
is exactly the stall a dead server must not cause.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import TrackingConfig

log = logging.getLogger("relalign.tracking")

# MLflow's own limits (mlflow.utils.validation), copied so we need not import private names.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
VERSIONED_PACKAGES = ("torch", "deepspeed", "timm", "webdataset", "mlflow", "sentencepiece")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers, for logging as params."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _as_mapping(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return value


def flatten(tree: Mapping[str, Any] | Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; dataclasses count as mappings; other values are kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in _as_mapping(tree).items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        value = _as_mapping(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def _clean_key(key: str) -> str:
    # MLflow accepts alphanumerics, '_', '-', '.', ' ', '/' in keys.
    cleaned = "".join(c if c.isalnum() or c in "_-. /" else "_" for c in str(key))
    return cleaned[:MAX_KEY]


def resolve_tracking_uri(cfg: TrackingConfig, output_dir: str | os.PathLike) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(Path(output_dir).resolve() / "mlflow.db")


def _local_artifact_location(uri: str) -> str | None:
    """Artifact root for a new experiment in a local sqlite store: a folder next to the db file.

    Without it MLflow would put artifacts in ./mlruns of whatever the working directory is.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts").resolve().as_uri()


def _set_http_env(cfg: TrackingConfig) -> None:
    # MLflow reads these at every request; defaults (7 retries, 120 s) would block a call for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.http_max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.http_timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


class Tracker:
    """The no-op tracker (non-zero ranks, tracking disabled); ``MlflowTracker`` does the work."""

    @staticmethod
    def create(cfg: TrackingConfig, is_main: bool, output_dir: str | os.PathLike,
               resume_run_id: str | None = None) -> "Tracker":
        """A real tracker on the main process when enabled, the no-op one otherwise.

        ``resume_run_id`` (from a checkpoint) continues that MLflow run instead of starting a new one.
        Bad settings raise UserError on every rank alike (validated before the rank check).
        """
        cfg.validate()
        if not (is_main and cfg.enabled):
            return Tracker()
        uri = resolve_tracking_uri(cfg, output_dir)
        log.info("MLflow: tracking at %s, experiment %r", uri, cfg.experiment_name)
        return MlflowTracker(cfg, uri, resume_run_id)

    @property
    def run_id(self) -> str | None:
        return None

    @property
    def stats(self) -> dict[str, int]:
        return {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")


class _BoundedQueue:
    """FIFO of log operations; when full, the oldest metrics batch makes room (others never dropped)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.dropped_metrics = 0

    def put(self, op: tuple) -> None:
        with self.cond:
            if len(self.items) >= self.maxsize:
                self._drop_oldest_metrics(op)
            else:
                self.items.append(op)
            self.cond.notify()

    def _drop_oldest_metrics(self, op: tuple) -> None:
        for i, queued in enumerate(self.items):
            if queued[0] == "metrics":
                del self.items[i]
                self.dropped_metrics += len(queued[1])
                self.items.append(op)
                return
        if op[0] == "metrics":
            self.dropped_metrics += len(op[1])
        else:
            self.items.append(op)

    def take_all(self, timeout: float | None) -> list[tuple]:
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            taken = list(self.items)
            self.items.clear()
            return taken

    def __len__(self) -> int:
        with self.cond:
            return len(self.items)


def _rejected_by_server(exc: Exception) -> bool:
    """True when the server answered and refused this one request (bad value, ...): no need to pause."""
    code = getattr(exc, "error_code", None)
    return code in {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "BAD_REQUEST", "INVALID_STATE"}


def _coalesce(ops: list[tuple]) -> list[tuple]:
    """Adjacent metric ops become one log_batch request (up to MLflow's 1000 metrics per batch)."""
    out: list[tuple] = []
    for op in ops:
        if (op[0] == "metrics" and out and out[-1][0] == "metrics"
                and len(out[-1][1]) + len(op[1]) <= MAX_METRICS_PER_BATCH):
            out[-1] = ("metrics", out[-1][1] + op[1])
        else:
            out.append(op)
    return out


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MlflowTracker(Tracker):
    """Logs to MLflow from a background thread; see the module docstring for the guarantees."""

    def __init__(self, cfg: TrackingConfig, tracking_uri: str, resume_run_id: str | None = None):
        cfg.validate()
        _set_http_env(cfg)
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self._resume_run_id = resume_run_id
        self._queue = _BoundedQueue(cfg.queue_size)
        self._wake = threading.Event()
        self._started = threading.Event()
        self._run_id: str | None = None
        self._client = None
        self._logged_params: dict[str, str] = {}
        self._closing = False
        self._closed = False
        self._down_until = 0.0
        self._warned = False
        self._failed_calls = 0
        self._dropped_on_failure = 0
        self._snapshots = Path(tempfile.mkdtemp(prefix="relalign-mlflow-"))
        self._snapshot_count = 0
        self._thread = threading.Thread(target=self._work, name="relalign-mlflow", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    # ---- training-thread side: only enqueues --------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The MLflow run id (waits, bounded, for the run to be created); None if it could not be."""
        # The first attempt is bounded by the HTTP timeout (remote) or a sqlite migration (local).
        self._started.wait(self.cfg.close_timeout_s)
        return self._run_id

    @property
    def stats(self) -> dict[str, int]:
        return {"dropped_metrics": self._queue.dropped_metrics + self._dropped_on_failure,
                "failed_calls": self._failed_calls, "pending": len(self._queue)}

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [(_clean_key(k), str(v)[:MAX_PARAM_VALUE]) for k, v in flatten(params).items()]
        self._put(("params", items))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            try:
                items.append((_clean_key(key), float(value), now_ms, int(step)))
            except (TypeError, ValueError):
                log.debug("metric %s=%r is not a number; not logged", key, value)
        self._put(("metrics", items))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._put(("tags", [(_clean_key(k), str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a whole directory; it is read when the background thread uploads it."""
        self._put(("artifact", str(Path(path).resolve()), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Snapshots ``text`` now and uploads it as ``artifact_file`` (e.g. "configs/experiment.yaml")."""
        if self._closed:
            return
        self._snapshot_count += 1
        folder = self._snapshots / str(self._snapshot_count)
        folder.mkdir()
        target = folder / Path(artifact_file).name
        target.write_text(text, encoding="utf-8")
        parent = Path(artifact_file).parent.as_posix()
        self._put(("artifact", str(target), None if parent == "." else parent))

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Flush what is queued (bounded by ``timeout``, default cfg.close_timeout_s) and end the run."""
        if self._closed:
            return
        if status not in RUN_STATUSES:
            raise ValueError(f"close: status must be one of {RUN_STATUSES}, got {status!r}")
        self._put(("end", status))
        self._closed = True
        self._closing = True
        self._wake.set()
        atexit.unregister(self._close_at_exit)
        limit = self.cfg.close_timeout_s if timeout is None else timeout
        self._thread.join(limit)
        if self._thread.is_alive():
            log.warning("MLflow: flush did not finish within %.0f s; %d queued log calls not sent (run %s)",
                        limit, len(self._queue), self._run_id)
            return
        if self.stats["dropped_metrics"]:
            log.warning("MLflow: %d metric values were dropped (queue full or server down)",
                        self.stats["dropped_metrics"])
        shutil.rmtree(self._snapshots, ignore_errors=True)

    def _close_at_exit(self) -> None:
        # The process is exiting without close(): the run did not end normally.
        self.close("FAILED", timeout=min(10.0, self.cfg.close_timeout_s))

    def _put(self, op: tuple) -> None:
        if self._closed or (op[0] in ("metrics", "params", "tags") and not op[1]):
            return
        self._queue.put(op)

    # ---- background thread ----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._attempt(("start",))
        finally:
            self._started.set()
        while True:
            pause = self._down_until - time.monotonic()
            if pause > 0 and not self._closing:
                self._wake.wait(min(pause, 1.0))
                continue
            ops = _coalesce(self._queue.take_all(timeout=0.5))
            for i, op in enumerate(ops):
                if self._attempt(op):
                    if op[0] == "end":
                        return
                    continue
                rest = ops[i + 1:]
                if self._closing:
                    self._dropped_on_failure += sum(len(o[1]) for o in rest if o[0] == "metrics")
                    return
                with self._queue.cond:
                    self._queue.items.extendleft(reversed(rest))
                break

    def _attempt(self, op: tuple) -> bool:
        try:
            if self._run_id is None:
                self._start_run()
            if op[0] != "start":
                self._apply(op)
        except Exception as exc:  # noqa: BLE001 - any failure of logging must not reach training
            return self._failed(op, exc)
        if self._warned and self._down_until:
            log.info("MLflow: %s reachable again", self.tracking_uri)
            self._down_until = 0.0
        return True

    def _failed(self, op: tuple, exc: Exception) -> bool:
        self._failed_calls += 1
        if op[0] == "metrics":
            self._dropped_on_failure += len(op[1])
        if self._run_id is not None and _rejected_by_server(exc):
            log.warning("MLflow rejected a %s call: %s", op[0], str(exc).splitlines()[0][:300])
            return True
        if not self._warned:
            self._warned = True
            log.warning("MLflow tracking at %s is unreachable or failing (%s); training continues and "
                        "logging is dropped while it stays down", self.tracking_uri,
                        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        else:
            log.debug("MLflow %s call failed: %s", op[0], exc)
        self._down_until = time.monotonic() + self.cfg.retry_interval_s
        return False

    def _start_run(self) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.tracking_uri)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        tags = dict(self.cfg.tags)
        if self._resume_run_id:
            run = self._find_run(client, self._resume_run_id)
            if run is not None:
                client.update_run(run.info.run_id, status="RUNNING")
                self._logged_params = dict(run.data.params)
                self._client, self._run_id = client, run.info.run_id
                log.info("MLflow: resumed run %s", self._run_id)
                return
            tags["relalign.resumed_from_run_id"] = self._resume_run_id
        experiment_id = self._experiment_id(client)
        run = client.create_run(experiment_id, run_name=self.cfg.run_name, tags=tags)
        self._client, self._run_id = client, run.info.run_id
        log.info("MLflow: started run %s", self._run_id)

    def _find_run(self, client, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        log.warning("MLflow: run %s (from the checkpoint) does not exist at %s; starting a new run",
                    run_id, self.tracking_uri)
        return None

    def _experiment_id(self, client) -> str:
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment_name
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                location = _local_artifact_location(self.tracking_uri)
                return client.create_experiment(name, artifact_location=location)
            except MlflowException as exc:  # another job created it meanwhile
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _apply(self, op: tuple) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, client, run_id = op[0], self._client, self._run_id
        if kind == "metrics":
            for chunk in _chunks(op[1], MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in chunk])
        elif kind == "params":
            for chunk in _chunks(self._new_params(op[1]), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
                self._logged_params.update(chunk)
        elif kind == "tags":
            for chunk in _chunks(op[1], MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk])
        elif kind == "artifact":
            path, artifact_path = op[1], op[2]
            if Path(path).is_dir():
                client.log_artifacts(run_id, path, artifact_path)
            else:
                client.log_artifact(run_id, path, artifact_path)
        elif kind == "end":
            client.set_terminated(run_id, status=op[1])

    def _new_params(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """MLflow params are immutable: skip ones already logged; name changed ones (resume) in a tag."""
        new, changed = {}, []
        for key, value in items:
            old = self._logged_params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                changed.append(key)
        if changed:
            log.info("MLflow: params already logged with other values, kept as they were: %s", changed)
            self._client.set_tag(self._run_id, "relalign.params_changed", ",".join(changed)[:MAX_TAG_VALUE])
        return list(new.items())
