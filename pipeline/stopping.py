"""Stopping early for preemption: the signal handler, the stop flag it sets, and what the job does after the
checkpoint is saved (Slurm requeue, or an exit code that asks for one).

Light on purpose (standard library only): ``launch/*.py`` install the handler before torch and DeepSpeed are
imported, since Slurm's warning signal can arrive during those imports. The handler only sets a flag; the
training loop reads it after each optimizer step and every rank agrees on stopping with one collective
(one rank seeing the signal is enough).

After a stop (checkpoint complete, MLflow run marked KILLED) the job ends with :func:`exit_after_stop`:
under Slurm rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` and every rank exits 0; where ``scontrol`` is
missing (a container) or fails, the exit code is :data:`REQUEUE_EXIT_CODE` and the sbatch scripts requeue
the job from outside. The requeued job resumes from the checkpoint into the same MLflow run.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Mapping, Optional

PREEMPT_SIGNAL = signal.SIGUSR1     # `#SBATCH --signal=USR1@<lead seconds>`, `scancel --signal=USR1`
REQUEUE_EXIT_CODE = 75              # EX_TEMPFAIL: stopped early with a complete checkpoint; requeue to resume
_SCONTROL_TIMEOUT_S = 30


class StopFlag:
    """Asks the loop to save a checkpoint and return after the current optimizer step. ``request`` may be
    called from another thread or a signal handler (it takes no lock the loop could hold); the first reason
    given is kept. ``honoured`` is set by the stage that stopped because of it (a flag set after the last
    phase has nothing left to stop)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: Optional[str] = None
        self.honoured: Optional[str] = None

    def request(self, reason: str = "requested") -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


_PROCESS_FLAG = StopFlag()


def process_flag() -> StopFlag:
    """The flag this process's preemption signal sets."""
    return _PROCESS_FLAG


def install_signal_handler() -> StopFlag:
    """Route the preemption signal to :func:`process_flag` (replacing an inherited SIG_IGN: the sbatch
    scripts shield the launchers with ``trap "" USR1``, and their workers inherit that)."""
    def on_signal(signum, frame) -> None:
        _PROCESS_FLAG.request(f"signal {signal.Signals(signum).name}")

    signal.signal(PREEMPT_SIGNAL, on_signal)
    return _PROCESS_FLAG


def slurm_job_id(env: Mapping[str, str] = os.environ) -> Optional[str]:
    return env.get("SLURM_JOB_ID") or None


def requeue(job_id: str, env: Mapping[str, str] = os.environ) -> Optional[str]:
    """``scontrol requeue job_id``; None when done, else why not (one line)."""
    exe = shutil.which("scontrol", path=env.get("PATH"))
    if exe is None:
        return "scontrol is not on PATH"
    try:
        done = subprocess.run([exe, "requeue", job_id], env=dict(env), capture_output=True, text=True,
                              timeout=_SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol requeue {job_id}: {exc}"
    if done.returncode != 0:
        return f"scontrol requeue {job_id}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return None


def exit_after_stop(stage: str, reason: str, is_main: bool, env: Mapping[str, str] = os.environ) -> int:
    """The process exit code once a stop was honoured and the checkpoint is complete (call on every rank,
    after the final barrier). Rank 0 requeues a Slurm job; the other ranks trust it."""
    job = slurm_job_id(env)
    if job is None:
        if is_main:
            print(f"[{stage}] stopped ({reason}); resume with --resume (exit {REQUEUE_EXIT_CODE})", flush=True)
        return REQUEUE_EXIT_CODE
    if not is_main:
        return 0 if shutil.which("scontrol", path=env.get("PATH")) else REQUEUE_EXIT_CODE
    problem = requeue(job, env)
    if problem is None:
        print(f"[{stage}] stopped ({reason}); requeued Slurm job {job}, it resumes from the checkpoint", flush=True)
        return 0
    print(f"[{stage}] stopped ({reason}); could not requeue ({problem}): exit {REQUEUE_EXIT_CODE} asks the "
          f"batch script to requeue", file=sys.stderr, flush=True)
    return REQUEUE_EXIT_CODE
