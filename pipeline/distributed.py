"""Process placement and the process group: one place for both.

``discover(env)`` reads where this process sits (rank, node, master address) from what the launcher set:
the DeepSpeed launcher and torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/...), a plain ``srun`` task
(``SLURM_*``; DeepSpeed never reads those), or nothing at all (one process). ``start_process_group`` exports
the variables torch and DeepSpeed read and starts the torch.distributed group once; training starts it
through DeepSpeed instead (``pipeline.train.runtime``), from the same ``ProcessInfo``.

The accessors below (``rank()``, ``world_size()``, ...) report the initialised group; before it exists
they report what ``discover`` reads from the environment, and the collective helpers act as the
world-size-1 identity. Collective helpers must be called by every rank of the group in the same order.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from pipeline.errors import UserError

_OPS = ("mean", "sum", "max", "min")
LOCALHOST = "127.0.0.1"
_PORT_BASE, _PORT_SPAN = 10000, 20000   # ports derived from SLURM_JOB_ID: below Linux's ephemeral range
_SCONTROL_TIMEOUT_S = 10


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the job. ``master_port`` 0: any free port (a single process only)."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str          # "deepspeed", "torchrun", "env" (RANK/WORLD_SIZE only), "srun" or "none"

    @property
    def node_count(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def env(self) -> dict[str, str]:
        """The variables torch's ``env://`` and DeepSpeed read (its CPU accelerator counts devices by
        LOCAL_SIZE, its checkpointing reads CROSS_RANK/CROSS_SIZE)."""
        values = {"RANK": self.rank, "LOCAL_RANK": self.local_rank, "WORLD_SIZE": self.world_size,
                  "LOCAL_WORLD_SIZE": self.local_world_size, "LOCAL_SIZE": self.local_world_size,
                  "NODE_RANK": self.node_rank, "CROSS_RANK": self.node_rank,
                  "CROSS_SIZE": self.node_count, "MASTER_ADDR": self.master_addr,
                  "MASTER_PORT": self.master_port}
        return {name: str(value) for name, value in values.items()}


# ----------------------------------------------------------------------------- discovery

def discover(env: Mapping[str, str]) -> ProcessInfo:
    """This process's place in the job, from the launcher's variables in ``env``.

    A launcher's ``RANK``/``WORLD_SIZE`` win over ``SLURM_*`` (a launcher started inside an srun step
    sees both). Under srun the master is the first node of the step; its address comes from
    ``scontrol`` (found on ``env["PATH"]``) when Slurm is installed, else from the node list itself.
    """
    placement = _placement(env)
    launcher = placement["launcher"]
    if launcher == "srun":
        addr = env.get("MASTER_ADDR") or _slurm_master_addr(env)
        port = _int(env, "MASTER_PORT") or _slurm_port(env)
    else:
        addr = env.get("MASTER_ADDR") or LOCALHOST
        port = _int(env, "MASTER_PORT") or 0
    if port == 0 and placement["world_size"] > 1:
        raise UserError(f"{launcher}: world size {placement['world_size']} but no MASTER_PORT is set")
    return ProcessInfo(master_addr=addr, master_port=port, **placement)


def _placement(env: Mapping[str, str]) -> dict[str, Any]:
    """rank, local rank, sizes, node rank and launcher name: everything but the master address."""
    if _has(env, "RANK") or _has(env, "WORLD_SIZE"):
        return _launcher_placement(env)
    if _has(env, "SLURM_PROCID") and _has(env, "SLURM_NTASKS"):
        return _srun_placement(env)
    return dict(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, launcher="none")


def _launcher_placement(env: Mapping[str, str]) -> dict[str, Any]:
    if _has(env, "TORCHELASTIC_RUN_ID"):
        launcher = "torchrun"
    elif _has(env, "LOCAL_SIZE") or _has(env, "CROSS_RANK"):
        launcher = "deepspeed"
    else:
        launcher = "env"
    rank, world = _int(env, "RANK") or 0, _int(env, "WORLD_SIZE") or 1
    # each launcher's own variable first: a stale one of another launcher must not win
    own = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE") if launcher == "deepspeed" else ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    local_world = _first_int(env, own) or world
    node_rank = _first_int(env, ("GROUP_RANK", "CROSS_RANK", "NODE_RANK"))
    return dict(rank=rank, local_rank=_int(env, "LOCAL_RANK") or 0, world_size=world,
                local_world_size=local_world,
                node_rank=rank // local_world if node_rank is None else node_rank, launcher=launcher)


def _srun_placement(env: Mapping[str, str]) -> dict[str, Any]:
    world = _first_int(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")) or 1
    node_rank = _int(env, "SLURM_NODEID") or 0
    local_world = _int(env, "SLURM_NTASKS_PER_NODE") or _tasks_on_node(
        env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""), node_rank) or world
    return dict(rank=_int(env, "SLURM_PROCID") or 0, local_rank=_int(env, "SLURM_LOCALID") or 0,
                world_size=world, local_world_size=local_world, node_rank=node_rank, launcher="srun")


def _tasks_on_node(spec: str, node_rank: int) -> Optional[int]:
    """Tasks on node ``node_rank`` from Slurm's compressed list: "2(x3),1" is 2, 2, 2, 1."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_rank] if node_rank < len(counts) else None


def _slurm_port(env: Mapping[str, str]) -> int:
    """The same port on every task of a job, different between jobs; needs SLURM_JOB_ID."""
    job = _int(env, "SLURM_JOB_ID")
    if job is None:
        raise UserError("srun: neither MASTER_PORT nor SLURM_JOB_ID is set; export MASTER_PORT")
    return _PORT_BASE + job % _PORT_SPAN


def _slurm_master_addr(env: Mapping[str, str]) -> str:
    """Address of the step's first node: its NodeAddr (node names need not resolve, e.g. several
    slurmd on one host), else its name."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("srun: no SLURM_JOB_NODELIST to take the master address from; export MASTER_ADDR")
    hostnames = _scontrol(env, "show", "hostnames", nodelist)
    first = hostnames.split()[0] if hostnames and hostnames.split() else first_hostname(nodelist)
    node = _scontrol(env, "show", "node", first) or ""
    match = re.search(r"\bNodeAddr=(\S+)", node)
    return match.group(1) if match else first


def _scontrol(env: Mapping[str, str], *args: str) -> Optional[str]:
    """stdout of ``scontrol args``, or None when Slurm is not installed or the call fails."""
    exe = shutil.which("scontrol", path=env.get("PATH"))
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *args], env=dict(env), capture_output=True, text=True,
                              timeout=_SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def first_hostname(nodelist: str) -> str:
    """First host of a Slurm host list without scontrol: "gpu[03-04,7],cpu1" -> "gpu03"."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    return re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", first)


def _has(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "") != ""


def _int(env: Mapping[str, str], name: str) -> Optional[int]:
    return int(env[name]) if _has(env, name) else None


def _first_int(env: Mapping[str, str], names: tuple[str, ...]) -> Optional[int]:
    for name in names:
        if _has(env, name):
            return int(env[name])
    return None


# ----------------------------------------------------------------------------- start-up

def default_timeout_s(env: Mapping[str, str] = os.environ) -> float:
    """DeepSpeed's default collective timeout: ``DEEPSPEED_TIMEOUT`` minutes, else 10."""
    return 60.0 * float(env.get("DEEPSPEED_TIMEOUT") or 10)


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def export_env(info: ProcessInfo) -> ProcessInfo:
    """Put ``info`` into ``os.environ`` for torch's env:// and DeepSpeed; a port 0 becomes a free port."""
    if info.master_port == 0:
        info = dataclasses.replace(info, master_port=free_port(info.master_addr))
    os.environ.update(info.env())
    return info


def start_process_group(info: ProcessInfo, backend: str, timeout_s: Optional[float] = None) -> ProcessInfo:
    """Start the torch.distributed group of ``info`` once (a second call returns at once); returns the
    info with the port actually used."""
    info = export_env(info)
    if not is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=info.rank,
                                world_size=info.world_size,
                                timeout=timedelta(seconds=timeout_s or default_timeout_s()))
    return info


# ----------------------------------------------------------------------------- the initialised group

def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank; before the process group exists, the one ``discover`` reads from the environment."""
    return dist.get_rank() if is_initialized() else _placement(os.environ)["rank"]


def world_size() -> int:
    """Number of processes; before the process group exists, as ``discover`` reads it."""
    return dist.get_world_size() if is_initialized() else _placement(os.environ)["world_size"]


def local_rank() -> int:
    """Rank within this node (from the environment, which ``start_process_group`` fills)."""
    return _placement(os.environ)["local_rank"]


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (picklable objects; use for small things only)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def hostnames() -> list[str]:
    """Host name of every rank, in rank order (collective)."""
    return all_gather_object(socket.gethostname())


def node_count() -> int:
    """Number of nodes in the job: from the launcher's environment when it tells the processes per node,
    otherwise by counting distinct host names (collective in that case; the environment is the same on
    all ranks, so all ranks take the same branch)."""
    env = os.environ
    if any(_has(env, n) for n in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE",
                                  "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE")):
        placement = _placement(env)
        if placement["world_size"] % placement["local_world_size"] == 0:
            return placement["world_size"] // placement["local_world_size"]
    return len(set(hostnames()))


def _reduce_device() -> torch.device:
    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _key_hash(keys: list[str]) -> float:
    return float(zlib.crc32("\x00".join(keys).encode("utf-8")))


def reduce_scalars(values: dict[str, float], op: str = "mean", union_keys: bool = False) -> dict[str, float]:
    """Reduce a dict of scalars over all ranks with ONE all_reduce of a packed float64 tensor.

    ``op``: "mean" (losses, rates), "sum" (counts), "max", "min". Every rank must pass the same
    keys: a mismatch of the same length is detected (a key checksum travels in the tensor) and
    raises RuntimeError on all ranks; a different NUMBER of keys makes the collective fail or hang.
    For per-rank counters whose keys may differ (skipped samples by reason), pass
    ``union_keys=True``: one extra all_gather of the key names, missing keys count as 0.
    """
    if op not in _OPS:
        raise ValueError(f"reduce_scalars: op must be one of {_OPS}, got {op!r}")
    if union_keys and is_initialized():
        every = set().union(*all_gather_object(sorted(values)))
        values = {k: values.get(k, 0.0) for k in every}
    keys = sorted(values)
    if not is_initialized():
        return {k: float(values[k]) for k in keys}
    h = _key_hash(keys)
    packed = [float(values[k]) for k in keys] + [h, -h]
    tensor = torch.tensor(packed, dtype=torch.float64, device=_reduce_device())
    reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM,
                 "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(tensor, op=reduce_op)
    result = tensor.cpu().tolist()
    n = dist.get_world_size()
    if op in ("mean", "sum"):
        same_keys = result[-2] == h * n and result[-1] == -h * n
    else:
        same_keys = result[-2] == h and result[-1] == -h
    if not same_keys:
        raise RuntimeError(f"reduce_scalars: ranks passed different keys (rank {dist.get_rank()} had {keys})")
    if op == "mean":
        return {k: v / n for k, v in zip(keys, result)}
    return dict(zip(keys, result))
