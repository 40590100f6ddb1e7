"""An MLflow server stopped mid-run and started again (a real `mlflow server`, same port and sqlite db): training
never waits on it, and every value logged during the outage reaches the run exactly once, live or through
``python -m pipeline.tracking replay``."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _stop, _wait_healthy, free_port
from pipeline import tracking
from pipeline.tracking import SPOOL_FILE, MlflowTracker, TrackingConfig

REPO = Path(__file__).resolve().parents[1]
# the module fixture runs once: under pytest-xdist every test of this file runs on one worker
pytestmark = pytest.mark.xdist_group("tracking_outage")
FAST_FAILURE = TrackingConfig(experiment_name="outage", http_timeout_s=1, http_max_retries=0, retry_interval_s=0.5,
                              close_timeout_s=3.0)


class RestartableServer:
    """`mlflow server` on a fixed port and sqlite db, stopped (by its process group) and started at will."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        log_file = self.root / "server.log"
        with open(log_file, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _wait_healthy(self.uri, self.proc, log_file)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = RestartableServer(tmp_path_factory.mktemp("restartable_mlflow"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _fast_http(monkeypatch):
    # The tracker only sets these when unset (an earlier test in the session may have): pin them for this file.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in _client(uri).get_metric_history(run_id, key))


def _log_steps(tracker: MlflowTracker, steps: range) -> float:
    """Seconds the training side spent in log_metrics for ``steps``."""
    start = time.monotonic()
    for step in steps:
        tracker.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
    return time.monotonic() - start


def _replay(spool: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "pipeline.tracking", "replay", str(spool), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def _tracker_during_outage(server: RestartableServer, out: Path, run_name: str) -> tuple[MlflowTracker, str]:
    """A tracker whose run exists, steps 1..5 sent; then the server stops and steps 6..15 are logged."""
    tracker = MlflowTracker(FAST_FAILURE, server.uri, run_name=run_name, output_dir=out)
    tracker.log_params({"lr": 0.1})
    _log_steps(tracker, range(1, 6))
    _wait_until(lambda: tracker.run_id is not None)  # the first import of mlflow takes seconds under load
    run_id = tracker.run_id
    _wait_until(lambda: _steps(server.uri, run_id) == [1, 2, 3, 4, 5])
    server.stop()
    assert _log_steps(tracker, range(6, 16)) < 0.1
    _wait_until(lambda: (out / SPOOL_FILE).is_file())
    return tracker, run_id


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_outage_mid_run_is_replayed_live_into_the_same_run(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="relalign.tracking")
    server.start()
    tracker, run_id = _tracker_during_outage(server, tmp_path, "live")
    server.start()
    assert _log_steps(tracker, range(16, 21)) < 0.1
    tracker.close()

    run = _client(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
    assert _steps(server.uri, run_id) == list(range(1, 21))
    assert _steps(server.uri, run_id, "lr") == list(range(1, 21))
    assert not (tmp_path / SPOOL_FILE).exists() and not (tmp_path / (SPOOL_FILE + ".state")).exists()
    stats = tracker.stats
    assert stats["dropped_metrics"] == 0 and stats["spooled_metrics"] == stats["replayed_metrics"] >= 20
    messages = [r.getMessage() for r in caplog.records if r.name == "relalign.tracking"]
    assert sum("buffering to" in m for m in messages) == 1
    assert sum("replayed" in m for m in messages) == 1
    assert not any("dropped" in m for m in messages)


def test_server_down_through_close_then_replay_command(server, tmp_path):
    server.start()
    tracker, run_id = _tracker_during_outage(server, tmp_path, "replayed")
    tracker.log_text("note", "notes/outage.txt")
    start = time.monotonic()
    tracker.close("KILLED")
    assert time.monotonic() - start < FAST_FAILURE.close_timeout_s
    spool = tmp_path / SPOOL_FILE
    assert spool.is_file() and tracker.stats["dropped_metrics"] == 0

    server.start()
    done = _replay(spool)
    assert done.returncode == 0, done.stderr
    assert "replayed 20 metric values" in done.stdout and "status KILLED" in done.stdout
    assert _steps(server.uri, run_id) == list(range(1, 16))
    client = _client(server.uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert {a.path for a in client.list_artifacts(run_id, "notes")} == {"notes/outage.txt"}
    assert not spool.exists() and not (tmp_path / "mlflow_spool_files").exists()
    assert _replay(spool).returncode == 2  # nothing left to replay


def test_interrupted_replay_does_not_duplicate(server, tmp_path, capsys):
    """A server that never answered the run (nothing listens at its address): the replay, pointed at a live
    server with --tracking-uri, creates the run. It is cut short twice: after 2 records (--max-records), and as
    if killed between sending a record and saving its progress (the state rewound to "sending")."""
    server.start()
    tracker = MlflowTracker(FAST_FAILURE, f"http://127.0.0.1:{free_port()}", run_name="never-up",
                            tags={"purpose": "outage"}, output_dir=tmp_path)
    for step in range(1, 31):
        tracker.log_metrics({"loss": float(step)}, step)
        time.sleep(0.02)  # several records: the background thread spools what it takes every round
    tracker.close()
    assert tracker.run_id is None
    spool = tmp_path / SPOOL_FILE
    records = [json.loads(line) for line in spool.read_text().splitlines()]
    assert records[0]["op"] == "run" and records[0]["run_id"] is None and len(records) >= 4

    # the command's main() in this process (test_server_down_through_close_then_replay_command runs it as one)
    assert tracking.main(["replay", str(spool), "--max-records", "2", "--tracking-uri", server.uri]) == 0
    assert "the rest stays" in capsys.readouterr().out
    state = json.loads((tmp_path / (SPOOL_FILE + ".state")).read_text())
    run_id = state["run_id"]
    part = _steps(server.uri, run_id)
    assert part and part == list(range(1, len(part) + 1)) and len(part) < 30

    lines = spool.read_bytes().splitlines(keepends=True)
    last_sent = sum(len(line) for line in lines[:3])  # header + the 2 replayed records
    before = last_sent - len(lines[2])
    (tmp_path / (SPOOL_FILE + ".state")).write_text(json.dumps({**state, "offset": before, "sending": before}))
    assert tracking.main(["replay", str(spool), "--tracking-uri", server.uri]) == 0
    assert "status FINISHED" in capsys.readouterr().out
    run = _client(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "never-up" and run.data.tags["purpose"] == "outage"
    assert _steps(server.uri, run_id) == list(range(1, 31))
    assert not spool.exists()
