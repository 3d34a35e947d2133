"""A training stage's MLflow logging survives MLflow failing: points logged while its SQLite
database is locked by another process, or while its server is away, are kept and sent later."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_for

from tasks.runtime.background_logging import BackgroundLog, TrackingUnavailable
from tasks.runtime.tracking import StageRun


def test_points_logged_while_the_mlflow_database_is_locked_reach_it_when_it_is_free(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    database = tmp_path / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    reports: list[str] = []
    log = BackgroundLog(StageRun(client, run_id), reports.append, retry_s=0.2)
    log.params({"trainable_params": 8192})
    for step in (1, 2):
        log.metrics({"loss": 4.0 - step}, step)
    wait_for(lambda: len(client.get_metric_history(run_id, "loss")) == 2, 30, "the first points")

    # another process holds the database (a second writer, a backup, an open sqlite3 shell)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    measured_while_locked = time.time()
    for step in (3, 4, 5):
        log.metrics({"loss": 4.0 - step}, step)  # returns at once: training is not held up
    log.tags({"resumed_from": "checkpoint-2"})
    wait_for(lambda: reports, 30, "the failure to be reported")
    assert "training goes on" in reports[0] and "database is locked" in reports[0]

    holder.execute("COMMIT")
    holder.close()
    log.close(wait_s=60)
    assert len(reports) == 2 and "answers again" in reports[1], reports  # said once each, not at every retry
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.0), (5, -1.0)]
    # the late points carry the time they were measured, not the time they were sent
    assert all(m.timestamp <= measured_while_locked * 1000 + 1000 for m in history)
    run = client.get_run(run_id)
    assert run.data.params["trainable_params"] == "8192" and run.data.tags["resumed_from"] == "checkpoint-2"


def test_a_server_that_stays_down_ends_the_stage_with_a_message_naming_it(monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    log = BackgroundLog(StageRun(MlflowClient(tracking_uri=nowhere), "0" * 32), lambda message: None, retry_s=0.2)
    log.metrics({"loss": 1.0}, 1)
    with pytest.raises(TrackingUnavailable, match=rf"{nowhere} did not answer for 2 s .*1 points of the training"):
        log.close(wait_s=2)
