"""MLflow's limits, the tracking file names, and the small helpers every tracking module shares: flattening
and cleaning params, the tracking URI, MLflow's HTTP settings, the versions of the packages a run depends on."""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
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
SPOOL_FILE = "mlflow_spool.jsonl"
SPOOL_FILES_DIR = "mlflow_spool_files"
FILE_OPS = ("artifact", "model", "inputs")
MAX_FILE_RECORD_TRIES = 3
REPLAY_COMMAND = "python -m pipeline.tracking replay"


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


def check_tracking_uri(uri: str, what: str) -> None:
    """UserError unless MLflow has a tracking store for ``uri``'s scheme (its registry: file paths, http(s),
    databases, Databricks, and any plugin's). Without this an ``ftp://`` URI only showed up as a run whose
    metrics all went to the local spool."""
    from urllib.parse import urlparse
    from mlflow.tracking._tracking_service import utils
    registry = getattr(utils, "_tracking_store_registry", None)
    schemes = getattr(registry, "_registry", None)
    scheme = urlparse(uri).scheme
    if schemes is None or scheme in schemes or (len(scheme) == 1 and os.name == "nt"):
        return
    from pipeline.errors import UserError
    raise UserError(f"config '{what}' = {uri}: MLflow has no tracking store for the scheme {scheme!r}; use one of "
                    f"{', '.join(sorted(k for k in schemes if k))}, or a local path")


def _local_artifact_location(uri: str) -> str | None:
    """Artifact root for a new experiment in a local sqlite store: a folder next to the db file.

    Without it MLflow would put artifacts in ./mlruns of whatever the working directory is.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts").resolve().as_uri()


def set_http_env(cfg: TrackingConfig) -> None:
    # MLflow reads these at every request; defaults (7 retries, 120 s) would block a call for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.http_max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.http_timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")


def _rejected_by_server(exc: Exception) -> bool:
    """True when the server answered and refused this one request (bad value, ...): no need to pause."""
    code = getattr(exc, "error_code", None)
    return code in {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                    "BAD_REQUEST", "INVALID_STATE"}


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
