"""bench/train_step.py end to end at its smallest: the real fine-tuning step of the tiny preset on the CPU."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEYS = ("preset", "device", "dtype", "mfu", "mining_share", "loader_wait_share", "step_s", "bare_mfu")


def parse_result(stdout: str) -> dict[str, str]:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    return dict(item.split("=", 1) for item in last.split()[1:])


def test_the_quick_tiny_run_prints_a_complete_result_line():
    done = subprocess.run([sys.executable, "bench/train_step.py", "--quick", "--preset", "tiny", "--device", "cpu",
                           "--steps", "2", "--warmup", "0", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = parse_result(done.stdout)
    assert set(result) == set(KEYS), done.stdout[-3000:] + done.stderr[-3000:]
    assert (result["preset"], result["device"], result["dtype"]) == ("tiny", "cpu", "fp32")
    values = {k: float(result[k]) for k in KEYS[3:]}
    assert all(math.isfinite(v) for v in values.values()), done.stdout[-3000:] + done.stderr[-3000:]
    assert values["mfu"] > 0 and values["bare_mfu"] > 0 and values["step_s"] > 0
    assert 0 <= values["mining_share"] <= 1 and 0 <= values["loader_wait_share"] <= 1
    assert "ratio 1.000" in done.stdout   # the counted FLOPs match the calls the forward hooks saw
