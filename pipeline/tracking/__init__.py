"""MLflow tracking that never stops or stalls training, and loses nothing of an outage.

``Tracker.create(cfg, is_main, output_dir)`` is the entry point; the guarantees (one background thread, a bounded
queue, the spool and its replay) are described in ``pipeline.tracking.tracker``. The modules:

- ``common``: MLflow's limits, file names, params flattening, the tracking URI and HTTP settings
- ``run``: one MLflow run, created or resumed, and the writer that logs into it
- ``queue``: the bounded queue between training and the background thread
- ``spool``: what could not be sent, on disk, and its replay
- ``background``: the background thread's half of ``MlflowTracker``
- ``tracker``: ``Tracker`` (no-op) and ``MlflowTracker``, system metrics
- ``cli``: ``python -m pipeline.tracking replay <spool> [--tracking-uri URI] [--max-records N]``

This is the only package that imports mlflow.
"""
from pipeline.config import TrackingConfig
from pipeline.tracking.cli import main
from pipeline.tracking.common import (FILE_OPS, MAX_FILE_RECORD_TRIES, MAX_KEY, MAX_METRICS_PER_BATCH,
                                      MAX_PARAM_VALUE, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VALUE, REPLAY_COMMAND,
                                      RUN_STATUSES, SPOOL_FILE, SPOOL_FILES_DIR, VERSIONED_PACKAGES, _clean_key,
                                      flatten, package_versions, resolve_tracking_uri, set_http_env)
from pipeline.tracking.queue import _BoundedQueue, _coalesce
from pipeline.tracking.run import DatasetRef, RunSpec, RunWriter, open_run
from pipeline.tracking.spool import Spool, replay_records, replay_spool
from pipeline.tracking.tracker import MlflowTracker, Tracker, start_node_metrics

__all__ = [
    "FILE_OPS", "MAX_FILE_RECORD_TRIES", "MAX_KEY", "MAX_METRICS_PER_BATCH", "MAX_PARAM_VALUE",
    "MAX_PARAMS_TAGS_PER_BATCH", "MAX_TAG_VALUE", "REPLAY_COMMAND", "RUN_STATUSES", "SPOOL_FILE", "SPOOL_FILES_DIR",
    "VERSIONED_PACKAGES", "DatasetRef", "MlflowTracker", "RunSpec", "RunWriter", "Spool", "Tracker",
    "TrackingConfig", "_BoundedQueue", "_clean_key", "_coalesce", "flatten", "main", "open_run", "package_versions",
    "replay_records", "replay_spool", "resolve_tracking_uri", "set_http_env", "start_node_metrics",
]
