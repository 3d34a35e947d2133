"""What a training stage logs to MLflow while it trains, sent from a thread of its own.

A tracking server that is stopped, slow or locked must not stop training. The task reads its
worker's events on one thread; an MLflow call that raises there kills the worker, and one that
blocks (MLflow's HTTP client retries for minutes) stalls the worker's output and then the
worker. So the task only queues what it logs, each metric with the time it was measured, and a
sender thread sends the queue in order. What fails stays queued and is sent again until the
server answers: no point of the curve is lost, and late points keep their own times. The first
failure is reported once, and so is the recovery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from mlflow.entities import Metric, Param, RunTag

from tasks.runtime.redaction import redact_uri
from tasks.runtime.tracking import StageRun, TrackingUnavailable, flatten, mlflow_wait_s

__all__ = ["BackgroundLog", "TrackingUnavailable"]
MAX_METRICS_PER_CALL = 1000  # MLflow's limit for one log_batch


class BackgroundLog:
    """Queue metrics, params and tags for one stage run; `close` sends what is left."""

    def __init__(self, run: StageRun, report: Callable[[str], None], retry_s: float = 2.0) -> None:
        self.run, self.report, self.retry_s = run, report, retry_s
        self._queue: list[dict[str, list[Any]]] = []
        self._changed = threading.Condition()
        self._closing = False
        self._give_up = threading.Event()
        self._failure: str | None = None  # the last error while failing, None while sending works
        self._thread = threading.Thread(target=self._send_all, name="mlflow-background-log", daemon=True)
        self._thread.start()

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self._put(metrics=[Metric(key, float(value), stamp, step) for key, value in metrics.items()])

    def params(self, params: dict[str, Any]) -> None:
        self._put(params=[Param(key, value[:6000]) for key, value in flatten(params).items()])

    def tags(self, tags: dict[str, str]) -> None:
        self._put(tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def _put(self, **batch: list[Any]) -> None:
        with self._changed:
            self._queue.append(batch)
            self._changed.notify_all()

    def _next(self) -> dict[str, list[Any]] | None:
        """The oldest batches as one call (metrics only are merged), or None once closed and sent."""
        with self._changed:
            while not self._queue and not self._closing:
                self._changed.wait()
            if not self._queue:
                return None
            merged: dict[str, list[Any]] = dict(self._queue[0])
            taken = 1
            for batch in self._queue[1:]:
                if set(batch) != {"metrics"} or set(merged) != {"metrics"}:
                    break
                if len(merged["metrics"]) + len(batch["metrics"]) > MAX_METRICS_PER_CALL:
                    break
                merged = {"metrics": merged["metrics"] + batch["metrics"]}
                taken += 1
            merged["_taken"] = [taken]
            return merged

    def _send_all(self) -> None:
        while (batch := self._next()) is not None:
            taken = batch.pop("_taken")[0]
            try:
                self.run.client.log_batch(self.run.run_id, **batch)
            except Exception as exc:  # any failure of the server or its store: keep the batch, try again
                self._failed(exc)
                if self._give_up.wait(self.retry_s):
                    return
                continue
            with self._changed:
                waited = len(self._queue)  # all queued now waited for the server, when it was failing
                del self._queue[:taken]
                self._changed.notify_all()
            if self._failure is not None:
                self._failure = None
                self.report(f"MLflow answers again; the {waited} updates it missed are logged with their own times")

    def _failed(self, exc: Exception) -> None:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if self._failure is None:
            self.report(
                f"MLflow at {self._where()} did not take a training update ({first_line}); training goes on, "
                "and what could not be logged is kept and sent again until it answers"
            )
        self._failure = first_line

    def _where(self) -> str:
        return redact_uri(str(self.run.client.tracking_uri))

    def close(self, wait_s: float | None = None) -> None:
        """Send everything queued, waiting up to `wait_s` (the setting) for a server that does not answer."""
        wait_s = mlflow_wait_s() if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            while self._queue and time.monotonic() < deadline:
                self._changed.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            unsent = sum(len(batch.get("metrics", [])) for batch in self._queue)
        if unsent or self._queue:
            self._give_up.set()
            self._thread.join(timeout=5)
            raise TrackingUnavailable(
                f"MLflow at {self._where()} did not answer for {wait_s:.0f} s after training ended "
                f"({self._failure}); {unsent} points of the training curve were not logged. The training "
                "output's loss_history.jsonl has every point; a retry of the stage resumes from its last checkpoint"
            )
        self._thread.join(timeout=5)
