"""MLflow tracking against a real `mlflow server`, a dead and a silent endpoint; cross-rank reduction
over a real 2-process gloo group."""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import pytest

from pipeline import distributed
from pipeline.tracking import MAX_PARAM_VALUE, Tracker, TrackingConfig, _BoundedQueue, package_versions


@pytest.fixture(autouse=True)
def _clean_tracking_env(monkeypatch):
    # The tracker sets MLFLOW_TRACKING_URI (mlflow.set_tracking_uri does); keep tests independent.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _unreachable_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "relalign.tracking" and "unreachable" in r.getMessage()]


def test_params_metrics_tags_artifacts_land_on_the_server(mlflow_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=mlflow_server, experiment_name="roundtrip", run_name="r1",
                         tags={"purpose": "test"})
    (tmp_path / "cfg.yaml").write_text("lr: 0.001\n")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "weights.bin").write_bytes(b"\0" * 1000)

    tracker = Tracker.create(cfg, is_main=True, output_dir=tmp_path)
    tracker.log_params({"train": {"lr": 1e-3, "steps": 5, "layers": [-1]}, "long": "x" * 7000,
                        "versions": package_versions()})
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "samples/s": 10.0 * step}, step=step)
    tracker.log_metrics({"grad_norm": float("nan"), "loss_inf": float("inf"), "loss": 9.0}, step=5)
    for step in range(1500):
        tracker.log_metrics({"bulk": float(step)}, step=step)
    tracker.set_tags({"world_size": 2})
    tracker.log_artifact(tmp_path / "cfg.yaml", "configs")
    tracker.log_artifact(model_dir, "model")
    tracker.log_text("hello", "notes/readme.txt")
    run_id = tracker.run_id
    tracker.close()
    assert run_id and tracker.stats["dropped_metrics"] == 0

    client = _client(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert client.get_experiment(run.info.experiment_id).name == "roundtrip"
    params = run.data.params
    assert params["train.lr"] == "0.001" and params["train.steps"] == "5" and params["train.layers"] == "[-1]"
    assert params["long"] == "x" * MAX_PARAM_VALUE
    assert params["versions.mlflow"] and params["versions.python"]
    assert run.data.tags["purpose"] == "test" and run.data.tags["world_size"] == "2"
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(s, 1.0 / (s + 1)) for s in range(5)] + [(5, 9.0)]
    assert math.isnan(client.get_metric_history(run_id, "grad_norm")[0].value)
    assert client.get_metric_history(run_id, "loss_inf")[0].value > 1e308  # MLflow stores inf as max float
    assert len(client.get_metric_history(run_id, "samples/s")) == 5
    assert sorted(m.value for m in client.get_metric_history(run_id, "bulk")) == [float(s) for s in range(1500)]
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert listed == {"configs", "model", "notes"}
    model_files = {a.path for a in client.list_artifacts(run_id, "model")}
    assert model_files == {"model/config.json", "model/weights.bin"}
    got = client.download_artifacts(run_id, "notes/readme.txt", str(tmp_path / "dl"))
    assert Path(got).read_text() == "hello"


def test_resume_continues_the_same_run(mlflow_server, tmp_path, caplog):
    cfg = TrackingConfig(tracking_uri=mlflow_server, experiment_name="resume")
    first = Tracker.create(cfg, True, tmp_path)
    first.log_params({"lr": 0.1, "resume": False})
    for step in range(3):
        first.log_metrics({"loss": float(step)}, step)
    run_id = first.run_id
    first.close("KILLED")
    assert _client(mlflow_server).get_run(run_id).info.status == "KILLED"

    second = Tracker.create(cfg, True, tmp_path, resume_run_id=run_id)
    second.log_params({"lr": 0.1, "resume": True, "new_key": 1})  # a changed value must not lose the batch
    for step in range(3, 5):
        second.log_metrics({"loss": float(step)}, step)
    assert second.run_id == run_id
    second.close()

    run = _client(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "resume": "False", "new_key": "1"}
    assert run.data.tags["relalign.params_changed"] == "resume"
    steps = sorted(m.step for m in _client(mlflow_server).get_metric_history(run_id, "loss"))
    assert steps == [0, 1, 2, 3, 4]

    third = Tracker.create(cfg, True, tmp_path, resume_run_id="0" * 32)  # unknown id: a new run
    assert third.run_id not in (None, run_id)
    third.close()
    assert _client(mlflow_server).get_run(third.run_id).data.tags["relalign.resumed_from_run_id"] == "0" * 32


def test_an_operation_that_overflows_the_queue_is_taken_only_after_the_metrics_it_spilled():
    """The background thread may take the queue while the training thread writes the spill: what it finds there
    must be newer than the spill, or the spool gets the run's end before its last metrics (seen in CI)."""
    written: list[tuple] = []

    def spill(ops: list[tuple]) -> None:
        written.extend(queue.take_all(timeout=0))   # the background thread, racing the spill
        written.extend(ops)

    queue = _BoundedQueue(2, spill=spill)
    metrics = [("metrics", [("loss", 1.0, 0, step)]) for step in range(2)]
    for op in [*metrics, ("end", "FINISHED")]:
        queue.put(op)
    written.extend(queue.take_all(timeout=0))
    assert written == [*metrics, ("end", "FINISHED")]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("spool", [True, False])
def test_dead_server_never_stalls_and_warns_once(tmp_path, caplog, spool):
    """With the spool (default) nothing is dropped: a full queue spills to it too; without it, as before."""
    caplog.set_level(logging.INFO, logger="relalign.tracking")
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{_closed_port()}", queue_size=100, spool=spool)
    start = time.monotonic()
    tracker = Tracker.create(cfg, True, tmp_path)
    tracker.log_params({"a": 1})
    for step in range(1000):
        tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step)
    logged = time.monotonic() - start
    tracker.close()
    total = time.monotonic() - start
    assert logged < 1.0, logged
    assert total < 5.0, total
    assert len(_unreachable_warnings(caplog)) == 1
    assert tracker.run_id is None
    if spool:
        assert tracker.stats["dropped_metrics"] == 0 and tracker.stats["spooled_metrics"] == 2000
        lines = (tmp_path / "mlflow_spool.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["op"] == "run" and json.loads(lines[-1]) == {"op": "end", "status": "FINISHED"}
    else:
        assert tracker.stats["dropped_metrics"] == 2000
        assert not (tmp_path / "mlflow_spool.jsonl").exists()


def test_silent_server_close_is_time_bounded(tmp_path, caplog):
    """A server that accepts connections but never answers (hung proxy): logging returns at once and
    close() gives up at its timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{silent.getsockname()[1]}",
                             http_timeout_s=30, close_timeout_s=2.0)
        start = time.monotonic()
        tracker = Tracker.create(cfg, True, tmp_path)
        for step in range(1000):
            tracker.log_metrics({"loss": 1.0}, step)
        logged = time.monotonic() - start
        tracker.close()
        total = time.monotonic() - start
    assert logged < 1.0, logged
    assert total < 4.0, total


def test_default_is_a_local_sqlite_store_in_the_output_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    tracker = Tracker.create(TrackingConfig(experiment_name="local"), True, out)
    tracker.log_metrics({"loss": 0.5}, 0)
    tracker.log_text("x: 1\n", "configs/x.yaml")
    tracker.close()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    assert tracker.run_id and (out / "mlflow.db").is_file()
    client = _client(uri)
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [0.5]
    assert list((out / "mlartifacts").rglob("x.yaml"))


def test_non_main_ranks_get_a_noop_tracker(tmp_path):
    cfg = TrackingConfig(tracking_uri="http://127.0.0.1:1")
    tracker = Tracker.create(cfg, is_main=False, output_dir=tmp_path)
    assert type(tracker) is Tracker
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.close()
    assert tracker.run_id is None
    assert not list(tmp_path.iterdir())


# ---- cross-rank reduction ------------------------------------------------------------------------
def _reduce_worker(rank: int, world: int, store_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "RANK"):
        os.environ.pop(name, None)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        values = {"loss": float(rank + 1), "skipped/corrupt": float(3 * rank), "lr": 0.5}
        result = {
            "mean": distributed.reduce_scalars(values),
            "sum": distributed.reduce_scalars(values, op="sum"),
            "max": distributed.reduce_scalars(values, op="max"),
            "rank": distributed.rank(), "world": distributed.world_size(),
            "hosts": distributed.hostnames(), "nodes": distributed.node_count(),
        }
        try:
            distributed.reduce_scalars({"loss": 1.0} if rank == 0 else {"other": 1.0}, op="sum")
            result["mismatch"] = "not detected"
        except RuntimeError as exc:
            result["mismatch"] = str(exc)
        skipped = {"corrupt": 2.0} if rank == 0 else {"too_small": 1.0, "corrupt": 1.0}
        result["union"] = distributed.reduce_scalars(skipped, op="sum", union_keys=True)
        distributed.barrier()
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_reduce_scalars_over_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["mean"] == {"loss": 1.5, "lr": 0.5, "skipped/corrupt": 1.5}
        assert res["sum"] == {"loss": 3.0, "lr": 1.0, "skipped/corrupt": 3.0}
        assert res["max"] == {"loss": 2.0, "lr": 0.5, "skipped/corrupt": 3.0}
        assert (res["rank"], res["world"], res["nodes"]) == (r, 2, 1)
        assert res["hosts"] == [socket.gethostname()] * 2
        assert "different keys" in res["mismatch"]
        assert res["union"] == {"corrupt": 3.0, "too_small": 1.0}


def test_helpers_without_a_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.reduce_scalars({"b": 2, "a": 1}) == {"a": 1.0, "b": 2.0}
    assert distributed.hostnames() == [socket.gethostname()] and distributed.node_count() == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.node_count() == 2 and distributed.world_size() == 8
    assert math.isclose(distributed.reduce_scalars({"x": 3.0}, op="sum")["x"], 3.0)
    distributed.barrier()
