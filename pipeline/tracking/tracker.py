"""MLflow tracking that never stops or stalls training, and loses nothing of an outage.

Only global rank 0 talks to MLflow: ``Tracker.create(cfg, is_main, output_dir)`` returns a real
``MlflowTracker`` there and a no-op ``Tracker`` everywhere else, so callers never branch on rank.
Every MLflow call (including the import of mlflow and the creation of the run) runs on one
background thread fed by a bounded queue: the training thread only appends to the queue.

When the server is unreachable (or answers too slowly) the thread warns once ("... buffering to FILE") and
appends what it could not send, and everything logged after it, to the spool ``<output_dir>/mlflow_spool.jsonl``
(JSON lines, see ``Spool``); a full queue spills its metrics there too. Every ``retry_interval_s`` it replays
the spool into the same run, in order, recording its progress in ``mlflow_spool.jsonl.state`` so that a replay
cut short never sends a value twice, and removes the spool when done ("replayed N metric values"). A run whose
server is still down at ``close()`` (bounded by ``close_timeout_s``) leaves the spool on disk; send it later
with ``python -m pipeline.tracking replay <spool> [--tracking-uri URI]``, which also sets the final status the
run closed with, and creates the run first when the server was down from the start. A spool found at start (a
job that ended during an outage) is moved aside to ``mlflow_spool.<time>.jsonl`` with a warning naming that
command. Values are dropped only with ``tracking.spool: false`` (the old behaviour: the oldest metrics of a full
queue, and the calls that fail) or when the spool cannot be written; a warning at close says how many.

MLflow's own async logging (``synchronous=False``) is not used: its queue is unbounded, a failure
surfaces as an exception at flush time, and its atexit hook waits for the queue to drain, which
is exactly the stall a dead server must not cause.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import TrackingConfig
from pipeline.tracking.background import _BackgroundSide
from pipeline.tracking.common import (MAX_PARAM_VALUE, MAX_TAG_VALUE, REPLAY_COMMAND, RUN_STATUSES, SPOOL_FILE,
                                      _clean_key, flatten, log, resolve_tracking_uri, set_http_env)
from pipeline.tracking.queue import _BoundedQueue, _coalesce
from pipeline.tracking.run import DatasetRef, RunSpec, RunWriter
from pipeline.tracking.spool import Spool


class Tracker:
    """The no-op tracker (non-zero ranks, tracking disabled); ``MlflowTracker`` does the work."""

    @staticmethod
    def create(cfg: TrackingConfig, is_main: bool, output_dir: str | os.PathLike,
               resume_run_id: str | None = None, run_name: str | None = None,
               tags: Mapping[str, str] | None = None) -> "Tracker":
        """A real tracker on the main process when enabled, the no-op one otherwise.

        ``resume_run_id`` (from a checkpoint) continues that MLflow run instead of starting a new one.
        A new run is named ``cfg.run_name`` or else ``run_name``, and tagged ``tags`` + ``cfg.tags``.
        What cannot be sent is spooled to ``<output_dir>/mlflow_spool.jsonl`` (module docstring).
        Bad settings raise UserError on every rank alike (validated before the rank check).
        """
        cfg.validate()
        if not (is_main and cfg.enabled):
            return Tracker()
        uri = resolve_tracking_uri(cfg, output_dir)
        log.info("MLflow: tracking at %s, experiment %r", uri, cfg.experiment_name)
        return MlflowTracker(cfg, uri, resume_run_id, run_name=cfg.run_name or run_name,
                             tags={**(tags or {}), **cfg.tags}, output_dir=output_dir)

    _node_metrics = None

    def attach_node_metrics(self, monitor) -> None:
        """A started system-metrics monitor of this node, stopped when the tracker closes."""
        self._node_metrics = monitor

    def _stop_node_metrics(self) -> None:
        if self._node_metrics is not None:
            self._node_metrics.finish()
            self._node_metrics = None

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

    def log_inputs(self, datasets: list[DatasetRef]) -> None:
        pass

    def log_model(self, path: str | os.PathLike, name: str) -> None:
        pass

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        self._stop_node_metrics()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")


def start_node_metrics(run_id: str, node_rank: int, tracking_uri: str, interval_s: float):
    """MLflow's system-metrics monitor for this node (``system/node<k>/cpu_utilization_percentage``, memory,
    GPU where present) logging into ``run_id``; None when psutil is missing (a warning says so)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       resume_logging=True, node_id=f"node{node_rank}", tracking_uri=tracking_uri)
        monitor.start()
    except Exception as exc:  # noqa: BLE001 - system metrics are optional; training must not stop
        log.warning("MLflow: no system metrics for node %d (%s)", node_rank, exc)
        return None
    return monitor


class MlflowTracker(_BackgroundSide, Tracker):
    """Logs to MLflow from a background thread; see the module docstring for the guarantees. This class is the
    training-thread side; the spooling and the background thread are ``_BackgroundSide`` (background.py).

    Each log operation is owned by exactly one of: the queue, ``_unsent`` (taken by the thread, not yet
    confirmed), the spool. ``_lock`` guards the hand-overs between them, so that the training thread (queue
    overflow), ``close`` (timeout) and the background thread never write one operation twice.
    """

    def __init__(self, cfg: TrackingConfig, tracking_uri: str, resume_run_id: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None,
                 output_dir: str | os.PathLike | None = None):
        cfg.validate()
        set_http_env(cfg)
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self._spec = RunSpec(tracking_uri, cfg.experiment_name, run_name or cfg.run_name,
                             dict(cfg.tags if tags is None else tags), resume_run_id)
        self._lock = threading.RLock()
        self._spool = self._open_spool(output_dir) if cfg.spool and output_dir is not None else None
        self._queue = _BoundedQueue(cfg.queue_size, spill=self._spill_overflow if self._spool else None)
        self._wake = threading.Event()
        self._started = threading.Event()
        self._run_id: str | None = None
        self._writer: RunWriter | None = None
        self._unsent: list[tuple] = []
        self._closing = False
        self._closed = False
        self._abandoned = False   # close() timed out and spooled what the thread still held
        self._finished = False
        self._spooling = False    # the spool holds records not replayed yet: new operations go behind them
        self._end_spooled = False
        self._down_until = 0.0
        self._warned = False
        self._spool_write_warned = False
        self._failed_calls = 0
        self._dropped_on_failure = 0
        self._spooled_metrics = 0
        self._replayed_metrics = 0
        self._replayed_in_outage = 0
        self._snapshots = Path(tempfile.mkdtemp(prefix="relalign-mlflow-"))
        self._snapshot_count = 0
        self._thread = threading.Thread(target=self._work, name="relalign-mlflow", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    def _open_spool(self, output_dir: str | os.PathLike) -> Spool:
        spool = Spool(Path(output_dir) / SPOOL_FILE, header=self._spool_header)
        if spool.exists():
            aside = spool.set_aside()
            log.warning("MLflow: an earlier run left log records it could not send; moved to %s. Replay them "
                        "with: %s %s", aside, REPLAY_COMMAND, aside)
        return spool

    def _spool_header(self) -> dict:
        return {"run_id": self._run_id, **dataclasses.asdict(self._spec), "tags": dict(self._spec.tags)}

    # ---- training-thread side: only enqueues --------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The MLflow run id (waits, bounded, for the run to be created); None if it could not be."""
        # The first attempt is bounded by the HTTP timeout (remote) or a sqlite migration (local).
        self._started.wait(self.cfg.close_timeout_s)
        return self._run_id

    @property
    def spool_path(self) -> Path | None:
        return self._spool.path if self._spool is not None else None

    @property
    def stats(self) -> dict[str, int]:
        return {"dropped_metrics": self._queue.dropped_metrics + self._dropped_on_failure,
                "failed_calls": self._failed_calls, "pending": len(self._queue),
                "spooled_metrics": self._spooled_metrics, "replayed_metrics": self._replayed_metrics}

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

    def log_inputs(self, datasets: list[DatasetRef]) -> None:
        self._put(("inputs", list(datasets)))

    def log_model(self, path: str | os.PathLike, name: str) -> None:
        """The exported model directory as a LoggedModel of this run (MLflow 3's "Logged models")."""
        self._put(("model", str(Path(path).resolve()), name))

    def close(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Flush what is queued (bounded by ``timeout``, default cfg.close_timeout_s) and end the run. What the
        server did not take by then stays in the spool, for ``python -m pipeline.tracking replay``."""
        self._stop_node_metrics()
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
            self._spool_after_timeout(limit)
            return
        self._report_unsent()
        shutil.rmtree(self._snapshots, ignore_errors=True)

    def _spool_after_timeout(self, limit: float) -> None:
        queued = _coalesce(self._queue.take_all(timeout=0))
        with self._lock:
            self._abandoned = True
            unsent, self._unsent = self._unsent, []
            self._spool_ops(unsent, maybe_sent_first=True)
            self._spool_ops(queued)
        if self._spool is not None and self._spool.exists():
            log.warning("MLflow: flush did not finish within %.0f s; what was not sent stays in %s. Replay it "
                        "with: %s %s", limit, self._spool.path, REPLAY_COMMAND, self._spool.path)
        else:
            log.warning("MLflow: flush did not finish within %.0f s; %d queued log calls not sent (run %s)",
                        limit, len(unsent) + len(queued), self._run_id)

    def _report_unsent(self) -> None:
        if self._spool is not None and self._spool.exists():
            log.warning("MLflow: the run ended with %d metric values (and its final status) not sent; they stay "
                        "in %s. Replay them with: %s %s", self._spooled_metrics - self._replayed_metrics,
                        self._spool.path, REPLAY_COMMAND, self._spool.path)
        if self.stats["dropped_metrics"]:
            log.warning("MLflow: %d metric values were dropped (%s)", self.stats["dropped_metrics"],
                        "server rejected them or the spool could not be written" if self._spool is not None
                        else "queue full or server down, and no spool: tracking.spool is off")

    def _close_at_exit(self) -> None:
        # The process is exiting without close(): the run did not end normally.
        self.close("FAILED", timeout=min(10.0, self.cfg.close_timeout_s))

    def _put(self, op: tuple) -> None:
        if self._closed or (op[0] in ("metrics", "params", "tags", "inputs") and not op[1]):
            return
        self._queue.put(op)

    def _spill_overflow(self, ops: list[tuple]) -> None:
        """Training thread: the queue is full (server slow or down); its metrics go to the spool."""
        with self._lock:
            if not self._warned:
                self._warn_outage("log queue full")
            self._spool_ops(_coalesce(ops))
