"""A real Slurm on this host for the tests: munged, slurmctld and two slurmd ("node1", "node2" on 127.0.0.1),
from Debian's packages (installed on first use when missing; needs root and apt). Every daemon is stopped by
the PID in its pid file. Facts behind the settings: ../shared/notes/slurm-facts.md."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODES = ("node1", "node2")
START_TIMEOUT_S = 60

SLURM_CONF = """\
ClusterName=relalign-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node1_port} CPUs=2 RealMemory=1000
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node2_port} CPUs=2 RealMemory=1000
PartitionName=test Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""


def ensure_installed() -> None:
    """apt-get the Slurm and munge packages unless slurmctld is already on PATH."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise RuntimeError("a real Slurm needs root to install and start (slurmctld, slurmd, munged)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   timeout=900)


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; ``env`` is what a client (sbatch, squeue) needs."""

    def __init__(self, root: Path, ports: tuple[int, int, int]):
        self.root = root
        self.conf = root / "slurm.conf"
        self.ports = ports
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.munged_pid: int | None = None

    # ---- start -------------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        ensure_installed()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld, n1, n2 = self.ports
        self.conf.write_text(SLURM_CONF.format(root=self.root, ctld_port=ctld, node1_port=n1, node2_port=n2))
        self._start_munge()
        self._run("slurmctld", "-f", str(self.conf), "-c")
        for node in NODES:
            self._run("slurmd", "-f", str(self.conf), "-N", node)
        self._wait_nodes_idle()
        return self

    def _start_munge(self) -> None:
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        pid_file = run_dir / "munged.pid"
        if not _alive(_read_pid(pid_file)):
            subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged --force"], check=True,
                           timeout=30)
            self.munged_pid = _read_pid(pid_file)
        check = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, text=True, timeout=30)
        if "Success" not in check.stdout:
            raise RuntimeError(f"munge does not work: {check.stdout[-500:]}{check.stderr[-500:]}")

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-1000:]}")

    def _wait_nodes_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        states = ""
        while time.monotonic() < deadline:
            states = self.client("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
            if sum("idle" in line for line in states.splitlines()) == len(NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {START_TIMEOUT_S} s: {states!r}\n{self.logs()}")

    # ---- use ---------------------------------------------------------------------------------------
    def client(self, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-1000:]}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, Reason, ...); {} once the job is forgotten."""
        out = self.client("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    # ---- stop --------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what still runs (a failed test may leave a job), then each daemon by the PID in its pid file:
        SIGTERM, then SIGKILL after 10 s."""
        self._cancel_jobs()
        pids = [_read_pid(self.root / f"slurmd-{n}.pid") for n in NODES]
        pids.append(_read_pid(self.root / "slurmctld.pid"))
        pids.append(self.munged_pid)
        for pid in pids:
            _terminate(pid)

    def _cancel_jobs(self) -> None:
        try:
            self.client("scancel", "--full", "--state=RUNNING", check=False)
            self.client("scancel", "--state=PENDING", check=False)
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and self.client("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        except (OSError, subprocess.TimeoutExpired):
            pass


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminate(pid: int | None) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
