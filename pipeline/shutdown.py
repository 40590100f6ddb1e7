"""A faster interpreter exit for the entry points (standard library only)."""
from __future__ import annotations

import atexit
import gc


def skip_final_collection() -> None:
    """Freeze the heap once every other exit handler has run, so that the interpreter's last garbage
    collection skips the objects torch, DeepSpeed, timm and MLflow leave behind: that collection alone took
    about 1.6 s of every process exit here. Call it before the heavy imports: handlers run last-in first-out,
    so the freeze comes after theirs (MLflow's final flush, the process group's teardown)."""
    atexit.register(gc.freeze)
