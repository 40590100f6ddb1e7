"""Two DeepSpeed launchers as two "nodes" (node ranks 0 and 1, master 127.0.0.1, a hostfile, --no_ssh: what
launch/slurm/job.sh runs on each node) form one 4-rank fine-tuning job that logs one MLflow run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_training import DEEPSPEED, REPO, _free_port, common_sets, mlflow_run

TIMEOUT_S = 600


def node_launcher(node_rank: int, hostfile: Path, port: int, sets: list[str], log: Path) -> subprocess.Popen:
    cmd = [str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={node_rank}",
           "--master_addr", "127.0.0.1", "--master_port", str(port),
           "launch/finetune.py", "--deepspeed_config", "ds_configs/zero2.json"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_launchers_with_node_ranks_form_one_four_rank_job_logging_one_mlflow_run(
        tiny_data, mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=2\nnodeB slots=2\n")
    sets = common_sets(tiny_data, run_dir, mlflow_server, steps=12) + [
        "eval.test=false", "checkpoint.export=false", "tracking.system_metrics_interval_s=1"]
    port = _free_port()
    procs = [node_launcher(k, hostfile, port, sets, tmp_path / f"node{k}.log") for k in (0, 1)]
    try:
        codes = [p.wait(TIMEOUT_S) for p in procs]
    finally:
        for p in procs:   # stopped by PID whatever happened
            if p.poll() is None:
                p.kill()
                p.wait(10)
    logs = "\n".join((tmp_path / f"node{k}.log").read_text()[-4000:] for k in (0, 1))
    assert codes == [0, 0], logs
    client, run = mlflow_run(mlflow_server, run_dir)
    p = run.data.params
    assert (p["world_size"], p["node_count"]) == ("4", "2"), logs
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 13))
    assert {"system/node0/cpu_utilization_percentage", "system/node1/cpu_utilization_percentage"} <= set(
        run.data.metrics), sorted(run.data.metrics)
