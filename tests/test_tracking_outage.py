"""A training stage's MLflow logging survives MLflow failing: points logged while its SQLite
database is locked by another process, or while its server is away, are kept and sent later."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest
from loopback import free_port, wait_for

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


class Warnings(logging.Handler):
    """What the stage tasks' MLflow helper tells the log, as the messages a user would read."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def count(self, text: str) -> int:
        return sum(text in message for message in self.messages)


@pytest.fixture
def tracking_warnings():
    """Warnings of tasks.runtime.tracking outside a Prefect run (Python's log, where it reports then)."""
    handler, logger = Warnings(), logging.getLogger("tasks.runtime.tracking")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


class DatabaseHolder:
    """Another process's exclusive hold on the MLflow database, let go once the stage said it waits."""

    def __init__(self, database: Path, warnings: Warnings) -> None:
        self.warnings = warnings
        self.waits_before = warnings.count("did not answer while")
        self.connection = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        self.connection.execute("BEGIN EXCLUSIVE")

    def release_once_waited(self) -> None:
        said = lambda: self.warnings.count("did not answer while") > self.waits_before  # noqa: E731
        wait_for(said, 120, "the stage to say it waits for MLflow")
        self.release()

    def release(self) -> None:
        self.connection.execute("COMMIT")
        self.connection.close()


def test_a_stage_waits_for_a_locked_database_at_its_start_and_keeps_its_output_when_mlflow_misses_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracking_warnings: Warnings
):
    """Start: the run is created once MLflow answers. End: past the wait the stage fails saying the
    output is kept, and running it again logs what MLflow missed instead of building it again."""
    import threading

    from mlflow.tracking import MlflowClient

    from tasks.contracts.manifest import StageResult
    from tasks.runtime.stage_output import StageContext, run_stage
    from tasks.runtime.tracking import WAIT_ENV, TrackingUnavailable, start_pipeline_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(WAIT_ENV, "60")
    workspace = tmp_path / "workspace"
    tracking = start_pipeline_run("outage", workspace, {"seed": 1}, {})
    database = workspace / "mlflow.db"
    builds: list[Path] = []
    holders: list[DatabaseHolder] = []

    def build(out: Path, run: StageRun) -> StageResult:
        builds.append(out)
        (out / "rows.txt").write_text("3 rows, built once")
        monkeypatch.setenv(WAIT_ENV, "1")  # the end gives up at its first failure
        holders.append(DatabaseHolder(database, tracking_warnings))  # held across the stage's end
        return StageResult(metrics={"rows": 3.0})

    def stage():
        ctx = StageContext(workspace=workspace, tracking=tracking)
        return run_stage("template", {"rows": 3}, [], "v1", ctx, build)

    at_start = DatabaseHolder(database, tracking_warnings)
    threading.Thread(target=at_start.release_once_waited, daemon=True).start()
    with pytest.raises(TrackingUnavailable, match=r"did not answer for 1 s while logging metrics.*output is complete"):
        stage()
    said = tracking_warnings.messages
    waited, recovered = [m for m in said if "did not answer while" in m], [m for m in said if "answers again" in m]
    assert len(waited) == 2 and "creating stage template's run" in waited[0] and "database is locked" in waited[0]
    assert len(recovered) == 1 and "creating stage template's run" in recovered[0], said  # once each, not per retry

    holders[0].release()  # MLflow is back: the stage runs again (Prefect's retry, or the same command)
    manifest = stage()
    assert len(builds) == 1 and not manifest.reused and (manifest.path / "rows.txt").is_file()
    assert tracking_warnings.count("without rebuilding") == 1
    client = MlflowClient(tracking_uri=tracking.uri)
    run = client.get_run(manifest.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"rows": "3"} and run.data.metrics == {"rows": 3.0}
    assert "manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.data.tags["mlflow.parentRunId"] == tracking.parent_run_id


def test_a_stage_whose_server_stays_down_fails_after_the_wait_naming_it_and_builds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracking_warnings: Warnings
):
    from tasks.runtime.stage_output import StageContext, run_stage
    from tasks.runtime.tracking import WAIT_ENV, Tracking, TrackingUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries take minutes
    monkeypatch.setenv(WAIT_ENV, "3")
    nowhere = f"http://127.0.0.1:{free_port()}"  # a tracking server that is stopped
    ctx = StageContext(workspace=tmp_path, tracking=Tracking(uri=nowhere, experiment_id="1", parent_run_id="0" * 32))
    built = []
    with pytest.raises(TrackingUnavailable, match=rf"{nowhere} did not answer for 3 s while creating stage template"):
        run_stage("template", {"rows": 3}, [], "v1", ctx, lambda out, run: built.append(out))
    assert not built and tracking_warnings.count(f"MLflow at {nowhere} did not answer while") == 1
