"""The bounded queue between the training thread and the background thread, and the merging of its metrics."""
from __future__ import annotations

import collections
import threading
from typing import Callable

from pipeline.tracking.common import MAX_METRICS_PER_BATCH


class _BoundedQueue:
    """FIFO of log operations. When full, the queued metrics make room: they go to ``spill`` (the spool) in one
    piece, or without one the oldest metrics batch is dropped (and counted); other operations are never dropped."""

    def __init__(self, maxsize: int, spill: Callable[[list[tuple]], None] | None = None):
        self.maxsize = maxsize
        self.spill = spill
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.dropped_metrics = 0

    def put(self, op: tuple) -> None:
        spilled: list[tuple] = []
        with self.cond:
            if len(self.items) < self.maxsize:
                self.items.append(op)
            elif self.spill is not None:
                spilled = self._take_metrics()
                if not spilled:
                    self.items.append(op)
            else:
                self._drop_oldest_metrics(op)
            self.cond.notify()
        if spilled:
            # Outside the lock (the spool has its own), and before ``op`` is queued: the consumer may spool what
            # it takes meanwhile, which must not be newer than the spill.
            self.spill(spilled)
            with self.cond:
                self.items.append(op)
                self.cond.notify()

    def _take_metrics(self) -> list[tuple]:
        metrics = [op for op in self.items if op[0] == "metrics"]
        self.items = collections.deque(op for op in self.items if op[0] != "metrics")
        return metrics

    def _drop_oldest_metrics(self, op: tuple) -> None:
        for i, queued in enumerate(self.items):
            if queued[0] == "metrics":
                del self.items[i]
                self.dropped_metrics += len(queued[1])
                self.items.append(op)
                return
        if op[0] == "metrics":
            self.dropped_metrics += len(op[1])
        else:
            self.items.append(op)

    def push_front(self, ops: list[tuple]) -> None:
        with self.cond:
            self.items.extendleft(reversed(ops))

    def take_all(self, timeout: float | None) -> list[tuple]:
        with self.cond:
            if not self.items and timeout:
                self.cond.wait(timeout)
            taken = list(self.items)
            self.items.clear()
            return taken

    def __len__(self) -> int:
        with self.cond:
            return len(self.items)


def _coalesce(ops: list[tuple]) -> list[tuple]:
    """Adjacent metric ops become one log_batch request (up to MLflow's 1000 metrics per batch)."""
    out: list[tuple] = []
    for op in ops:
        if (op[0] == "metrics" and out and out[-1][0] == "metrics"
                and len(out[-1][1]) + len(op[1]) <= MAX_METRICS_PER_BATCH):
            out[-1] = ("metrics", out[-1][1] + op[1])
        else:
            out.append(op)
    return out


def _metric_count(ops: list[tuple]) -> int:
    return sum(len(op[1]) for op in ops if op[0] == "metrics")
