"""The roll call that names the ranks a failed collective lost, on a real TCPStore (the rendezvous store of
env://), and the SIGTERM grace that lets a survivor print it under DeepSpeed's launcher."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import torch.distributed as dist

from pipeline import lost_ranks
from pipeline.distributed import free_port


def _store_pair():
    port = free_port()
    host = dist.TCPStore("127.0.0.1", port, 3, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 3, is_master=False, wait_for_workers=False)
    return host, client


def test_the_ranks_that_never_answer_are_the_lost_ones():
    host, client = _store_pair()
    client.set(lost_ranks.ROLL_CALL_KEY.format(rank=2), "1")   # rank 2 survived and answered
    started = time.monotonic()
    answered = lost_ranks.roll_call(0, 3, grace_s=0.5, store=host)
    assert answered == [0, 2] and time.monotonic() - started >= 0.5
    line = lost_ranks.describe(RuntimeError("Connection reset by peer\nmore"), answered, 0, 3, "resume hint",
                               grace_s=0.5)
    assert line == ("rank 0: a collective failed (Connection reset by peer); lost rank(s) 1: no answer within "
                    "0.5 s after the collective failed. The job stops; resume hint")
    assert lost_ranks.reports(answered, 0) and not lost_ranks.reports(answered, 2)


def test_everyone_answering_returns_without_waiting_out_the_grace():
    host, client = _store_pair()
    for r in (1, 2):
        client.set(lost_ranks.ROLL_CALL_KEY.format(rank=r), "1")
    started = time.monotonic()
    assert lost_ranks.roll_call(0, 3, grace_s=30, store=host) == [0, 1, 2]
    assert time.monotonic() - started < 5


def test_a_store_that_is_gone_means_rank_0_was_lost():
    host, client = _store_pair()
    del host   # the store's server lives in rank 0's process
    time.sleep(0.2)
    started = time.monotonic()
    answered = lost_ranks.roll_call(1, 3, grace_s=1.0, store=client)
    assert answered is None and time.monotonic() - started < 15
    line = lost_ranks.describe(RuntimeError("x"), None, 1, 3, "hint")
    assert "lost rank 0 (it hosts the rendezvous store" in line and lost_ranks.reports(None, 1)


def test_sigterm_inside_the_grace_context_ends_the_process_late_not_at_once():
    code = textwrap.dedent("""
        import os, signal, time
        from pipeline.lost_ranks import terminated_after_grace
        with terminated_after_grace(1.0):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            print("still running", flush=True)
            time.sleep(30)
        print("never")
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert done.stdout.strip() == "still running" and done.returncode == 128 + 15, (done.stdout, done.stderr)
    assert 1.0 <= took < 20


def test_sigterm_outside_the_context_keeps_its_default():
    code = ("import os, signal, time\nfrom pipeline.lost_ranks import terminated_after_grace\n"
            "with terminated_after_grace(5.0):\n    pass\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -15, done.stderr
