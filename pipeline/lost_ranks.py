"""Which ranks a failed collective lost, and the one line that says so.

A rank killed mid-step makes its peers' next collective fail at once (the connection is reset); a hung rank
makes it fail after the collective timeout (``train.collective_timeout_s``). Either way the exception only
names a socket address. The survivors then answer a roll call in the rendezvous store (the TCPStore that
rank 0 hosts for ``env://``): each writes its own key and waits a short grace for the others'. The ranks
that never answer are the lost ones. If rank 0 itself is lost, the store is gone with it, and the line says
that instead.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

ROLL_CALL_KEY = "relalign/alive/{rank}"
GRACE_S = 5.0
TERM_GRACE_S = GRACE_S + 3.0
POLL_S = 0.1

# What a collective raises when a peer is gone or stuck: torch's DistError family (timeouts, network and
# backend errors); gloo's transport also raises a plain RuntimeError naming the pair that broke.
_GLOO_FAULT = re.compile(r"gloo|Connection (reset|closed) by peer|Timed out waiting|Broken pipe", re.I)


def is_collective_fault(exc: BaseException) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and bool(_GLOO_FAULT.search(str(exc)))


def _store():
    from torch.distributed import distributed_c10d
    return distributed_c10d._get_default_store()


def roll_call(rank: int, world_size: int, grace_s: float = GRACE_S, store=None) -> Optional[list[int]]:
    """The ranks that answered within ``grace_s`` (this one included), or None when the store is gone
    (rank 0 lost)."""
    try:
        store = store or _store()
        store.set_timeout(timedelta(seconds=grace_s))   # a dead rank 0 would block each call for the group timeout
        store.set(ROLL_CALL_KEY.format(rank=rank), "1")
        deadline = time.monotonic() + grace_s
        while True:
            answered = [r for r in range(world_size) if store.check([ROLL_CALL_KEY.format(rank=r)])]
            if len(answered) == world_size or time.monotonic() >= deadline:
                return answered
            time.sleep(POLL_S)
    except Exception:   # the store lives in rank 0: any failure to reach it means rank 0 is gone
        return None


@contextmanager
def terminated_after_grace(seconds: float = TERM_GRACE_S):
    """Inside, SIGTERM ends the process ``seconds`` later instead of at once. DeepSpeed's launcher terminates
    every rank as soon as one has died; the grace lets a survivor reach its failing collective and the roll
    call that names the dead rank (the launcher itself only kills after 30 s). Main thread only."""
    def on_term(signum, frame) -> None:
        signal.signal(signum, signal.SIG_IGN)   # one timer, however many SIGTERMs follow
        timer = threading.Timer(seconds, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reason(exc: BaseException) -> str:
    from pipeline.errors import first_line
    first = first_line(exc)
    return first if len(first) <= 160 else first[:157] + "..."


def describe(exc: BaseException, answered: Optional[list[int]], rank: int, world_size: int,
             resume_hint: str, grace_s: float = GRACE_S) -> str:
    """The one line (without ``error:``) a surviving rank prints."""
    if answered is None:
        lost = "lost rank 0 (it hosts the rendezvous store, which no longer answers)"
    else:
        missing = [r for r in range(world_size) if r not in answered]
        names = ", ".join(str(r) for r in missing) if missing else "none (every rank answered)"
        lost = f"lost rank(s) {names}: no answer within {grace_s:g} s after the collective failed"
    return (f"rank {rank}: a collective failed ({_reason(exc)}); {lost}. The job stops; {resume_hint}")


def reports(answered: Optional[list[int]], rank: int) -> bool:
    """One survivor prints: the lowest rank that answered (every survivor when the store is gone)."""
    return answered is None or rank == min(answered)


@contextmanager
def reported(run_dir: str):
    """A collective that fails on a lost (killed or hung) rank becomes one line naming that rank and where a
    relaunch resumes (JobFault, exit 1), printed by one survivor, instead of every rank's traceback. SIGTERM
    ends the process a few seconds late meanwhile (:func:`terminated_after_grace`). ``run_dir``: the stage's,
    whose newest complete checkpoint the line names."""
    with terminated_after_grace():   # around the roll call too: the launcher's SIGTERM comes then
        try:
            yield
        except Exception as exc:
            if not is_collective_fault(exc):
                raise
            from pipeline import distributed as dist_utils
            from pipeline.errors import JobFault
            rank, world_size = dist_utils.rank(), dist_utils.world_size()
            answered = roll_call(rank, world_size)
            if not reports(answered, rank):
                raise JobFault("") from exc
            raise JobFault(describe(exc, answered, rank, world_size, _resume_hint(run_dir))) from exc


def _resume_hint(run_dir: str) -> str:
    from pipeline.config import resolve_path
    from pipeline.train.checkpoint import complete_tags
    ckpt = resolve_path(run_dir) / "checkpoints"
    tags = complete_tags(ckpt) if ckpt.is_dir() else []
    where = f"{ckpt / tags[-1][1]}, the last complete checkpoint" if tags else "the start (no complete checkpoint yet)"
    return f"relaunching with checkpoint.resume=auto continues from {where}"
