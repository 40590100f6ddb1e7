"""Process placement from the launchers' environments, and a real 2-process gloo group started from
SLURM_* variables alone (as srun sets them), without Slurm installed."""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import distributed
from pipeline.distributed import ProcessInfo, discover
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent

FAKE_SCONTROL = """#!/bin/sh
# what scontrol says on a one-host test cluster of node1 and node2 (NodeAddr=127.0.0.1)
if [ "$1 $2" = "show hostnames" ]; then printf 'node1\\nnode2\\n'; exit 0; fi
if [ "$1 $2" = "show node" ]; then
  echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=127.0.0.1 NodeHostName=localhost"; exit 0
fi
exit 1
"""


def fake_scontrol(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "scontrol"
    exe.write_text(FAKE_SCONTROL)
    exe.chmod(0o755)
    return str(bin_dir)


def test_deepspeed_launcher():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert discover(env) == ProcessInfo(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                                        master_addr="10.0.0.1", master_port=29500, launcher="deepspeed")
    # a LOCAL_WORLD_SIZE left over in the environment does not override the DeepSpeed launcher's LOCAL_SIZE
    assert discover({**env, "LOCAL_WORLD_SIZE": "1"}).node_count == 2


def test_torchrun():
    env = {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "host0", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "none"}
    info = discover(env)
    assert info == ProcessInfo(rank=2, local_rank=0, world_size=4, local_world_size=2, node_rank=1,
                               master_addr="host0", master_port=1234, launcher="torchrun")
    assert info.node_count == 2


def test_srun_two_nodes_two_tasks_each_asks_scontrol_for_the_first_node_address(tmp_path):
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "4242",
           "PATH": fake_scontrol(tmp_path)}
    info = discover(env)
    placement = (info.rank, info.local_rank, info.world_size, info.local_world_size, info.node_rank)
    assert placement == (3, 1, 4, 2, 1)
    assert (info.master_addr, info.launcher) == ("127.0.0.1", "srun")
    assert info.master_port == discover(dict(env, SLURM_PROCID="0", SLURM_NODEID="0")).master_port
    assert 1024 < info.master_port < 32768
    assert info.master_port != discover(dict(env, SLURM_JOB_ID="4243")).master_port


def test_srun_without_scontrol_takes_the_first_host_of_the_list_and_respects_master_port():
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "3", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "gpu[03-04,7],cpu1", "SLURM_TASKS_PER_NODE": "1(x3)", "SLURM_JOB_ID": "7",
           "MASTER_PORT": "4000", "PATH": "/nonexistent"}
    info = discover(env)
    assert (info.master_addr, info.master_port) == ("gpu03", 4000)
    assert (info.local_world_size, info.node_count) == (1, 3)
    assert distributed.first_hostname("rack[1-2]-n[3-4]") == "rack1-n3"
    assert discover(dict(env, SLURM_NTASKS_PER_NODE="2", SLURM_NTASKS="4")).local_world_size == 2


def test_a_launcher_inside_an_srun_step_wins_over_slurm():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "9",
           "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501"}
    info = discover(env)
    assert (info.launcher, info.rank, info.world_size, info.node_rank) == ("deepspeed", 5, 8, 1)


def test_no_launcher_is_one_process_on_localhost_with_a_port_chosen_at_start():
    info = discover({"PATH": "/usr/bin"})
    assert info == ProcessInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                               master_addr="127.0.0.1", master_port=0, launcher="none")
    with pytest.raises(UserError, match="MASTER_PORT"):
        discover({"RANK": "0", "WORLD_SIZE": "2"})


def test_process_info_env_is_what_torch_and_deepspeed_read():
    info = ProcessInfo(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                       master_addr="127.0.0.1", master_port=1234, launcher="srun")
    env = info.env()
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                                "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "2",
        "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    assert dataclasses.replace(discover(env), launcher="srun") == info   # the exported env reads back


def test_default_timeout_is_deepspeeds():
    assert distributed.default_timeout_s({}) == 600.0
    assert distributed.default_timeout_s({"DEEPSPEED_TIMEOUT": "3"}) == 180.0


def test_accessors_before_the_group_read_slurm_too(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2)")
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (2, 4, 0)
    assert distributed.node_count() == 2


# ----------------------------------------------------------------------------- a real group

WORKER = """
import os, torch, torch.distributed as dist
from pipeline import distributed
info = distributed.start_process_group(distributed.discover(os.environ), "gloo", timeout_s=60)
distributed.start_process_group(info, "gloo", timeout_s=60)   # a second start is a no-op
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(f"rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item()} launcher={info.launcher} "
      f"local={distributed.local_rank()}", flush=True)
dist.destroy_process_group()
"""


def free_slurm_job_id() -> int:
    """A job id whose derived master port is free now."""
    for job_id in range(os.getpid() % 20000, 20000 * 2, 7919):
        port = 10000 + job_id % 20000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in the Slurm-derived range")


def srun_like_env(task: int, job_id: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "GROUP_RANK")}
    env.update(SLURM_PROCID=str(task), SLURM_LOCALID=str(task), SLURM_NTASKS="2", SLURM_NODEID="0",
               SLURM_JOB_NODELIST="localhost", SLURM_TASKS_PER_NODE="2", SLURM_JOB_ID=str(job_id),
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def test_two_plain_python_processes_with_slurm_variables_form_one_gloo_group():
    job_id = free_slurm_job_id()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, env=srun_like_env(task, job_id),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for task in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert lines == ["rank=0 world=2 sum=3.0 launcher=srun local=0",
                     "rank=1 world=2 sum=3.0 launcher=srun local=1"]


# ----------------------------------------------------------------------------- training's start-up

def test_training_starts_deepspeed_from_the_discovered_env_with_the_timeout(monkeypatch):
    import deepspeed
    from pipeline.train import runtime
    calls = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(kw))
    from torch.distributed import distributed_c10d
    for default in ("default_pg_timeout", "default_pg_nccl_timeout"):   # set by init_distributed: restored after
        monkeypatch.setattr(distributed_c10d, default, getattr(distributed_c10d, default))
    for name in discover({}).env():   # every variable export_env writes, restored after the test
        monkeypatch.delenv(name, raising=False)
    info = runtime.init_distributed(discover({}), "gloo", timeout_s=90)
    assert info.master_port > 0 and os.environ["MASTER_PORT"] == str(info.master_port)
    assert calls[0]["auto_mpi_discovery"] is False and calls[0]["timeout"].total_seconds() == 90
    assert (calls[0]["rank"], calls[0]["world_size"], calls[0]["dist_backend"]) == (0, 1, "gloo")


def test_the_collective_timeout_comes_from_the_config():
    from pipeline.config import load_config
    from pipeline.errors import UserError
    from pipeline.train import runtime
    assert runtime._collective_timeout_s(load_config(None, ["data.synthetic={}"])) == \
        distributed.default_timeout_s()
    set_30 = load_config(None, ["data.synthetic={}", "train.collective_timeout_s=30"])
    assert runtime._collective_timeout_s(set_30) == 30
    with pytest.raises(UserError, match="collective_timeout_s"):
        load_config(None, ["data.synthetic={}", "train.collective_timeout_s=-1"])


ONE_PROCESS = """
import torch
import torch.distributed as dist
from pipeline import distributed
from pipeline.train import runtime
runtime.init_distributed(distributed.discover({}), "gloo", timeout_s=60)
print("world", dist.get_world_size(), flush=True)
from deepspeed.utils import groups   # ZeRO reduces over this clone: it had torch's 30-minute default
clone = groups._clone_world_group()
print("clone timeout", clone._get_backend(torch.device("cpu")).options._timeout.total_seconds(), flush=True)
"""


@pytest.mark.slow
def test_one_process_without_any_launcher_env_starts_deepspeed_without_mpi(tmp_path):
    """...and without JIT-building DeepSpeed's CPU shm op (40-85 s cold): gloo does the collectives; the groups
    DeepSpeed makes later time out after the collective timeout too."""
    env = srun_like_env(0, 1)
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    extensions = tmp_path / "torch_extensions"
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    done = subprocess.run([sys.executable, "-c", ONE_PROCESS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == ["world 1", "clone timeout 60.0"]
    assert not list(extensions.rglob("*shm*")), sorted(extensions.rglob("*"))
