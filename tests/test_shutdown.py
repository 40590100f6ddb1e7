"""The entry points freeze the heap after every other exit handler (pipeline/shutdown.py), so the interpreter's
final garbage collection does not walk the libraries' objects."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# registered before the entry point runs, so it runs after the entry point's own exit handlers
PROBE = """
import atexit, gc, runpy, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("entry", ["finetune", "pretrain", "evaluate"])
def test_each_entry_point_freezes_the_heap_after_the_other_exit_handlers(entry):
    proc = subprocess.run([sys.executable, "-c", PROBE, f"launch/{entry}.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "frozen at exit: True" in proc.stdout, proc.stdout[-2000:]


def test_without_the_call_nothing_is_frozen():
    probe = "import atexit, gc; atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "frozen at exit: False" in proc.stdout
