"""Timing shared by the benchmarks: wall seconds of repeated calls, synchronised with the device."""
from __future__ import annotations

import time
from typing import Callable


def call_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None,
                 warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls; ``sync`` waits for the
    device (``torch.cuda.synchronize``) so queued GPU work is counted."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times
