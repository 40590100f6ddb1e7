"""bench/soak.py --quick end to end: ~200 real fine-tuning steps of the tiny model (one process, DataLoader workers)
on shards with corrupt samples mixed in (about a minute on 2 CPU cores)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULT_RE = re.compile(r"^RESULT rss_growth=(\S+) fd_growth=(\S+) skipped=(\S+) injected=(\S+)$")


@pytest.mark.slow
def test_the_quick_soak_counts_every_injected_corrupt_sample_and_leaks_no_descriptors():
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    done = subprocess.run([sys.executable, "bench/soak.py", "--quick"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    out = done.stdout[-4000:] + done.stderr[-3000:]
    assert done.returncode == 0, out
    lines = done.stdout.strip().splitlines()
    match = RESULT_RE.match(lines[-1]) if lines else None
    assert match, out   # a run that broke prints nan values, which the int() below would not parse either
    _, fd_growth, skipped, injected = match.groups()
    assert int(skipped) == int(injected) > 0, out
    assert int(fd_growth) <= 0, out
    assert "problem:" not in done.stdout, out   # per-reason counts, monotone counters, every sample every epoch
