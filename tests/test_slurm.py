"""The sbatch scripts, unchanged, on a real Slurm (slurmctld + two slurmd on this host, tests/slurm_cluster.py):
a 2-node fine-tune preempted with the Slurm warning signal, requeued, resumed into the same MLflow run and
finished with every step logged once; then evaluate.sbatch on its export. If Slurm cannot start, the test fails
(it never skips)."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster
from test_training import TINY_MODEL, common_sets

REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 420
STEPS = 60
# one cluster: under pytest-xdist every test of this file runs on one worker
pytestmark = pytest.mark.xdist_group("slurm")


def _free_ports(n: int) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), tuple(_free_ports(3)))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def experiment_yaml(sets: list[str], path: Path) -> Path:
    """The ``--set`` list as a nested experiment YAML (values parsed as YAML, as --set does)."""
    tree: dict = {}
    for item in sets:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


def submit(slurm: SlurmCluster, script: str, env: dict) -> str:
    done = slurm.client("bash", str(REPO / "launch" / "slurm" / script), "--parsable",
                        env={"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env})
    return done.stdout.strip().split(";")[0]


def wait_for(what, predicate, timeout_s: float, slurm: SlurmCluster, logs: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{job_logs(logs)}\n{slurm.logs()}")


def job_logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.out")))


RELEASE_GRACE_S = 5


def requeued_and_released(slurm: SlurmCluster, job: str, pending_since: dict) -> bool:
    """True once the job restarted. Slurm holds a requeued job ~2 min (Reason=BeginTime) so that the old
    attempt is torn down first; released earlier than a few seconds, slurmd refuses to launch it ("Job already
    killed, do not launch batch job") and the job FAILS. So release it RELEASE_GRACE_S after it turned PENDING."""
    info = slurm.job(job)
    if info.get("Restarts") != "1":
        return False
    if info.get("JobState") == "PENDING":
        first = pending_since.setdefault("t", time.monotonic())
        if time.monotonic() - first >= RELEASE_GRACE_S:
            slurm.client("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        return False
    return info.get("JobState") in ("RUNNING", "COMPLETED", "FAILED")


def finished(slurm: SlurmCluster, job: str) -> dict:
    info = slurm.job(job)
    return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else {}


def logged_step(node_log: Path) -> int:
    steps = re.findall(r"\[finetune\] step (\d+)/", node_log.read_text(errors="replace")) if node_log.exists() else []
    return int(steps[-1]) if steps else 0


@pytest.mark.slow
def test_finetune_sbatch_two_nodes_preempted_requeued_resumes_into_one_mlflow_run(
        slurm, tiny_data, mlflow_server, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    sets = common_sets(tiny_data, run_dir, mlflow_server, steps=STEPS) + [
        "tracking.experiment_name=pytest-slurm", "tracking.system_metrics_interval_s=2"]
    assert TINY_MODEL in sets
    config = experiment_yaml(sets, tmp_path / "experiment.yaml")
    env = {"NODES": "2", "CPUS_PER_NODE": "1", "TIME_LIMIT": "00:20:00", "LOG_DIR": str(logs),
           "EXPERIMENT_CONFIG": str(config), "DS_CONFIG": "ds_configs/zero2.json", "JOB_NAME": "pytest-ft",
           "MASTER_PORT": str(_free_ports(1)[0]), "OMP_NUM_THREADS": "1", "RELALIGN_ROOT": str(REPO)}
    job = submit(slurm, "finetune.sbatch", env)
    node0 = logs / f"pytest-ft-{job}-node0.out"
    wait_for("training to pass step 5", lambda: logged_step(node0) >= 5, JOB_TIMEOUT_S, slurm, logs)
    slurm.client("scancel", "--signal=USR1", job)

    pending_since: dict = {}
    wait_for("the requeue", lambda: requeued_and_released(slurm, job, pending_since), 120, slurm, logs)
    final = wait_for("the job to complete", lambda: finished(slurm, job), JOB_TIMEOUT_S, slurm, logs)
    assert final["JobState"] == "COMPLETED", f"{final}\n{job_logs(logs)}"

    node_logs = node0.read_text()
    assert (logs / f"pytest-ft-{job}-node1.out").is_file()
    assert "requeued Slurm job" in node_logs and "resumed from checkpoint" in node_logs
    batch_log = (logs / f"pytest-ft-{job}.out").read_text()
    assert "restart 0: 2 node(s)" in batch_log and "restart 1: 2 node(s)" in batch_log

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("pytest-slurm").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(1, STEPS + 1))   # every step once: none lost to the stop, none repeated
    assert run.data.params["node_count"] == "2" and run.data.params["world_size"] == "2"
    tags = run.data.tags
    assert tags["relalign.restart_count"] == "1" and tags["relalign.resumed_from"].startswith("step")
    assert tags["mlflow.runName"] == "relalign-finetune" and tags["relalign.zero_stage"] == "2"
    assert tags["relalign.stage"] == "finetune" and tags["relalign.iais_alignment"] == "singular"
    assert "txt_r1" in tags["mlflow.note.content"]   # the test recall table is the run's description
    assert {"system/node0/cpu_utilization_percentage", "system/node1/cpu_utilization_percentage"} <= set(
        run.data.metrics)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    models = client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id] and models[0].status == "READY"
    assert json.loads((run_dir / "test_metrics.json").read_text())["rsum"] >= 0
