"""The spool: log operations that could not be sent, on local disk, and their replay into the run (also what
``python -m pipeline.tracking replay`` does)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from pipeline.tracking.common import (FILE_OPS, MAX_FILE_RECORD_TRIES, MAX_METRICS_PER_BATCH, SPOOL_FILES_DIR,
                                      _chunks, _rejected_by_server, log)
from pipeline.tracking.run import DatasetRef, RunSpec, RunWriter, open_run


def _op_record(op: tuple) -> dict:
    kind = op[0]
    if kind in ("metrics", "params", "tags"):
        return {"op": kind, "items": [list(item) for item in op[1]]}
    if kind == "artifact":
        return {"op": kind, "path": op[1], "artifact_path": op[2]}
    if kind == "model":
        return {"op": kind, "path": op[1], "name": op[2]}
    if kind == "inputs":
        return {"op": kind, "datasets": [dataclasses.asdict(ref) for ref in op[1]]}
    if kind == "end":
        return {"op": kind, "status": op[1]}
    raise ValueError(f"no spool record for a {kind!r} operation")


def _record_op(record: dict) -> tuple:
    kind = record["op"]
    if kind in ("metrics", "params", "tags"):
        return kind, [tuple(item) for item in record["items"]]
    if kind == "artifact":
        return kind, record["path"], record["artifact_path"]
    if kind == "model":
        return kind, record["path"], record["name"]
    if kind == "inputs":
        return kind, [DatasetRef(**ref) for ref in record["datasets"]]
    if kind == "end":
        return kind, record["status"]
    raise ValueError(f"unknown spool record {kind!r}")


class Spool:
    """Log operations that could not be sent, one JSON object a line, oldest first.

    The first line is the ``run`` header (the run id when known, and the ``RunSpec`` a replay creates the run
    from when not). ``<path>.state`` says how far replays got: ``offset`` (bytes of the spool replayed),
    ``sending`` (offset of the record whose request was under way: it may have reached the server, so its
    metrics are checked against the run before they are sent again), ``tries`` (of that record: an artifact,
    model or dataset record is given up after ``MAX_FILE_RECORD_TRIES``, so a broken artifact store cannot hold
    the metrics behind it forever) and ``run_id`` (the run replayed into,
    which wins over the header's). Files the spool must keep (``log_text`` snapshots) live in
    ``mlflow_spool_files/<random>/`` beside it; each is removed once uploaded.
    """

    def __init__(self, path: str | os.PathLike, header: Callable[[], dict] | None = None):
        self.path = Path(path).resolve()
        self.state_path = self.path.with_name(self.path.name + ".state")
        self.files_dir = self.path.with_name(SPOOL_FILES_DIR)
        self.lock = threading.RLock()
        self._header = header

    def exists(self) -> bool:
        return self.path.exists()

    def append(self, ops: list[tuple], maybe_sent_first: bool = False) -> None:
        """Raises OSError when the file cannot be written."""
        lines = []
        for i, op in enumerate(ops):
            parts = _chunks(op[1], MAX_METRICS_PER_BATCH) if op[0] == "metrics" else [op[1:]]
            for part in parts:
                record = _op_record(("metrics", part) if op[0] == "metrics" else (op[0], *part))
                if maybe_sent_first and i == 0:
                    record["maybe_sent"] = True
                lines.append(json.dumps(record) + "\n")
        with self.lock:
            if not self.path.exists():
                lines.insert(0, json.dumps({"op": "run", **(self._header() if self._header else {})}) + "\n")
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(lines))

    def keep_file(self, path: str | os.PathLike) -> str:
        """A copy of ``path`` that lives as long as the spool needs it."""
        target = self.files_dir / uuid.uuid4().hex / Path(path).name
        target.parent.mkdir(parents=True)
        shutil.copy2(path, target)
        return str(target)

    def release_file(self, record: dict) -> None:
        path = Path(record.get("path") or "")
        if record["op"] == "artifact" and path.parent.parent == self.files_dir:
            shutil.rmtree(path.parent, ignore_errors=True)

    def header(self) -> dict:
        with open(self.path, encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
        if first.get("op") != "run":
            raise ValueError(f"{self.path} is not an MLflow spool of pipeline.tracking (no run header)")
        return first

    def state(self) -> dict:
        try:
            saved = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            saved = {}
        return {"offset": 0, "sending": None, "tries": 0, "run_id": None, **saved}

    def save_state(self, **changes) -> None:
        with self.lock:
            state = {**self.state(), **changes}
            partial = self.state_path.with_name(self.state_path.name + ".tmp")
            partial.write_text(json.dumps(state), encoding="utf-8")
            os.replace(partial, self.state_path)

    def note_run_id(self, run_id: str) -> None:
        """Records the run the spool goes into (when the run was created after the spool was started)."""
        with self.lock:
            if self.exists() and self.state()["run_id"] != run_id:
                self.save_state(run_id=run_id)

    def pending(self) -> list[tuple[int, int, dict | None]]:
        """(start, end, record) of each line not replayed yet; record None for a line that does not parse
        (a write cut short by a crash)."""
        with self.lock:
            start = self.state()["offset"]
            with open(self.path, "rb") as f:
                f.seek(start)
                data = f.read()
        out = []
        for raw in io.BytesIO(data):
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                record = None
            if record is None:
                log.warning("MLflow: skipping an unreadable line of %s at byte %d", self.path, start)
            out.append((start, start + len(raw), record))
            start += len(raw)
        return out

    def remove_if_replayed(self) -> bool:
        with self.lock:
            if self.exists() and self.path.stat().st_size > self.state()["offset"]:
                return False
            for path in (self.path, self.state_path):
                path.unlink(missing_ok=True)
            try:
                self.files_dir.rmdir()
            except OSError:
                pass
            return True

    def set_aside(self) -> Path:
        """Moves a spool an earlier tracker left here (with its state) to a new name, returned."""
        aside = self.path.with_name(f"{self.path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{self.path.suffix}")
        os.replace(self.path, aside)
        if self.state_path.exists():
            os.replace(self.state_path, aside.with_name(aside.name + ".state"))
        return aside


def replay_records(spool: Spool, writer: RunWriter, on_record: Callable[[dict], None] | None = None,
                   limit: int | None = None) -> bool:
    """Sends the spool's unreplayed records through ``writer``, in order (consecutive metrics as one request),
    saving progress after each request; True when none is left. At most ``limit`` records (lines) when given. A
    record the server refuses is skipped (warned); any other failure is raised, and the state says where the
    next replay continues (without duplicates)."""
    state = spool.state()
    pending = spool.pending()
    for start, end, record in _merged_metrics(pending[:limit] if limit is not None else pending):
        tries = state["tries"] + 1 if state["sending"] == start else 1
        if record is None or record["op"] == "run":
            pass
        elif record["op"] in FILE_OPS and tries > MAX_FILE_RECORD_TRIES:
            log.warning("MLflow: giving up on the %s record %s after %d failed tries", record["op"],
                        record.get("path") or record.get("datasets"), tries - 1)
        else:
            spool.save_state(sending=start, tries=tries)
            _send_record(writer, record, record.get("maybe_sent") or state["sending"] == start)
            spool.release_file(record)
            if on_record is not None:
                on_record(record)
        spool.save_state(offset=end, sending=None, tries=0)
    return limit is None or limit >= len(pending)


def _merged_metrics(pending: list[tuple[int, int, dict | None]]):
    """The spool's (start, end, record) lines with consecutive metrics records merged, up to one log_batch."""
    merged = None
    for start, end, record in pending:
        if (merged is not None and merged[2] is not None and record is not None
                and record["op"] == merged[2]["op"] == "metrics"
                and len(merged[2]["items"]) + len(record["items"]) <= MAX_METRICS_PER_BATCH):
            maybe_sent = bool(merged[2].get("maybe_sent") or record.get("maybe_sent"))
            merged = (merged[0], end, {"op": "metrics", "items": merged[2]["items"] + record["items"],
                                       "maybe_sent": maybe_sent})
            continue
        if merged is not None:
            yield merged
        merged = (start, end, record)
    if merged is not None:
        yield merged


def _send_record(writer: RunWriter, record: dict, maybe_sent: bool) -> None:
    try:
        writer.apply(_record_op(record), skip_logged_metrics=maybe_sent)
    except Exception as exc:  # noqa: BLE001 - a refused record must not block the ones after it
        if not _rejected_by_server(exc):
            raise
        log.warning("MLflow rejected a replayed %s record: %s", record["op"], str(exc).splitlines()[0][:300])


def replay_spool(path: str | os.PathLike, tracking_uri: str | None = None,
                 limit: int | None = None) -> dict[str, Any]:
    """Replays a spool a tracker left (server down until the end) into its run; idempotent, resumable.

    The run is the state's or the header's; when neither names one (the server was down from the start) or
    ``tracking_uri`` does not hold it, the run is created now from the header's RunSpec (or the header's resume
    run continued) and its id saved in the state at once, so a replay cut short continues the same run. The
    final status the spool holds (the tracker's close) is set last. Returns {"run_id", "metrics", "status",
    "complete"}.
    """
    from mlflow.tracking import MlflowClient

    spool = Spool(path)
    header = spool.header()
    uri = tracking_uri or header["tracking_uri"]
    client = MlflowClient(tracking_uri=uri)
    run_id = spool.state()["run_id"] or header.get("run_id")
    spec = RunSpec(uri, header["experiment_name"], header.get("run_name"), header.get("tags") or {},
                   run_id or header.get("resume_run_id"))
    writer = open_run(client, spec)
    spool.save_state(run_id=writer.run_id)
    result: dict[str, Any] = {"run_id": writer.run_id, "metrics": 0, "status": None}

    def count(record: dict) -> None:
        if record["op"] == "metrics":
            result["metrics"] += len(record["items"])
        elif record["op"] == "end":
            result["status"] = record["status"]

    complete = replay_records(spool, writer, on_record=count, limit=limit)
    result["complete"] = complete and spool.remove_if_replayed()
    return result
