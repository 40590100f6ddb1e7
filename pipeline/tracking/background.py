"""The background thread's half of ``MlflowTracker``: it sends what the queue holds, spools what fails, and
replays the spool once the server answers again."""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.tracking.common import _rejected_by_server, log
from pipeline.tracking.queue import _coalesce, _metric_count
from pipeline.tracking.run import open_run
from pipeline.tracking.spool import replay_records


class _BackgroundSide:
    """Spooling and the background thread of ``MlflowTracker`` (which sets up the state these methods share, in
    its ``__init__``, and holds the training-thread side)."""

    # ---- spooling (callers hold _lock) -----------------------------------------------------------
    def _spool_ops(self, ops: list[tuple], maybe_sent_first: bool = False) -> None:
        """Appends ``ops`` to the spool; drops them (counted, warned) when there is none or it cannot be written."""
        if not ops:
            return
        self._end_spooled = self._end_spooled or any(op[0] == "end" for op in ops)
        if self._spool is not None:
            try:
                self._spool.append([self._spoolable(op) for op in ops], maybe_sent_first)
                self._spooling = True
                self._spooled_metrics += _metric_count(ops)
                return
            except OSError as exc:
                if not self._spool_write_warned:
                    self._spool_write_warned = True
                    log.warning("MLflow: cannot write the spool %s (%s); log calls that cannot be sent are "
                                "dropped", self._spool.path, exc)
        self._dropped_on_failure += _metric_count(ops)

    def _spoolable(self, op: tuple) -> tuple:
        """A ``log_text`` snapshot is copied next to the spool (the snapshots go when the tracker closes)."""
        if op[0] == "artifact" and Path(op[1]).is_relative_to(self._snapshots):
            return ("artifact", self._spool.keep_file(op[1]), op[2])
        return op

    def _must_spool(self) -> bool:
        return self._spool is not None and (self._spooling or time.monotonic() < self._down_until)

    # ---- background thread ----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._attempt(("start",))
        finally:
            self._started.set()
        while not (self._finished or self._abandoned):
            if self._waiting_without_spool():
                continue
            ops = _coalesce(self._queue.take_all(timeout=0.5))
            with self._lock:
                if self._abandoned:
                    self._spool_ops(ops)
                    return
                self._unsent = ops
            self._send_unsent()
            if self._spooling and (self._end_spooled or time.monotonic() >= self._down_until):
                self._replay_live()
            if self._end_spooled:
                self._finished = True  # one replay try after the end was spooled; the rest is the replay command's

    def _waiting_without_spool(self) -> bool:
        """Without a spool the thread pauses (the queue holds what comes meanwhile) while the server is down."""
        pause = self._down_until - time.monotonic()
        if self._spool is None and pause > 0 and not self._closing:
            self._wake.wait(min(pause, 1.0))
            return True
        return False

    def _send_unsent(self) -> None:
        while True:
            with self._lock:
                if not self._unsent or self._abandoned:
                    return
                if self._must_spool():
                    self._spool_ops(self._unsent)
                    self._unsent = []
                    return
                op = self._unsent[0]
            sent = self._attempt(op)
            with self._lock:
                if self._abandoned:  # close() spooled _unsent, this op included (marked: it may have arrived)
                    return
                if sent:
                    self._unsent.pop(0)
                    self._finished = self._finished or op[0] == "end"
                elif self._spool is not None:
                    self._spool_ops(self._unsent, maybe_sent_first=True)
                    self._unsent = []
                else:
                    self._drop_failed()
                    return

    def _drop_failed(self) -> None:
        """No spool: the failed op is lost; the rest waits in the queue (or is lost too when closing)."""
        failed, rest, self._unsent = self._unsent[0], self._unsent[1:], []
        self._dropped_on_failure += _metric_count([failed])
        if self._closing:
            self._dropped_on_failure += _metric_count(rest)
            self._finished = True
        else:
            self._queue.push_front(rest)

    def _replay_live(self) -> None:
        try:
            if self._run_id is None:
                self._start_run()
            self._spool.note_run_id(self._run_id)
            replay_records(self._spool, self._writer, on_record=self._count_replayed)
        except Exception as exc:  # noqa: BLE001 - the server went away again; the state says where to go on
            self._failed(("replay",), exc)
            return
        with self._lock:
            if not self._spool.remove_if_replayed():
                return  # more was spooled meanwhile: the next round replays it
            self._spooling = False
            self._warned = False
            log.warning("MLflow: %s reachable again; replayed %d metric values from %s into run %s",
                        self.tracking_uri, self._replayed_in_outage, self._spool.path, self._run_id)
            self._replayed_in_outage = 0

    def _count_replayed(self, record: dict) -> None:
        if record["op"] == "metrics":
            self._replayed_metrics += len(record["items"])
            self._replayed_in_outage += len(record["items"])

    def _attempt(self, op: tuple) -> bool:
        try:
            if self._run_id is None:
                self._start_run()
            if op[0] != "start":
                self._writer.apply(op)
        except Exception as exc:  # noqa: BLE001 - any failure of logging must not reach training
            return self._failed(op, exc)
        if self._warned and self._down_until and not self._spooling:
            log.info("MLflow: %s reachable again", self.tracking_uri)
            self._down_until = 0.0
            self._warned = False
        return True

    def _failed(self, op: tuple, exc: Exception) -> bool:
        self._failed_calls += 1
        if self._run_id is not None and _rejected_by_server(exc):
            self._dropped_on_failure += _metric_count([op])
            log.warning("MLflow rejected a %s call: %s", op[0], str(exc).splitlines()[0][:300])
            return True
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if not self._warned:
            self._warn_outage(reason)
        else:
            log.debug("MLflow %s call failed: %s", op[0], exc)
        self._down_until = time.monotonic() + self.cfg.retry_interval_s
        return False

    def _warn_outage(self, reason: str) -> None:
        self._warned = True
        if self._spool is not None:
            log.warning("MLflow tracking at %s is unreachable or failing (%s); training continues, buffering to %s",
                        self.tracking_uri, reason, self._spool.path)
        else:
            log.warning("MLflow tracking at %s is unreachable or failing (%s); training continues and "
                        "logging is dropped while it stays down", self.tracking_uri, reason)

    def _start_run(self) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.tracking_uri)
        writer = open_run(MlflowClient(tracking_uri=self.tracking_uri), self._spec)
        self._writer, self._run_id = writer, writer.run_id
        if self._spool is not None:
            self._spool.note_run_id(self._run_id)
